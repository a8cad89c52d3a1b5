"""The console in a real browser (headless Chromium) against one real server, dispatcher and
Ray for the session: sign in, open a finished job, see the heatmap and the table, download
the certificate, watch a running job's progress change and cancel it, be refused another
tenant's job, read without JavaScript, fit 1280 px and 390 px, pass axe-core with no serious
violation, print the certificate to A4, and see the chain turn red after an audit row is
edited in the database (last: it breaks the chain for the rest of the session)."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from api.client import Client
from tests.console.browser_kit import (  # noqa: F401 - fixtures
    WIDTHS,
    Service,
    browser,
    overflow_px,
    serious_violations,
    service,
    shots,
    sign_in,
)
from tests.dispatch.conftest import tiny_model_dir  # noqa: F401 - fixture
from tests.dispatch.kit import http_spec

pytestmark = pytest.mark.slow


def new_page(browser: Any, width: int = 1280, **options: Any) -> Any:  # noqa: F811
    context = browser.new_context(viewport={"width": width, "height": 900},
                                  accept_downloads=True, **options)
    context.set_default_timeout(30_000)
    return context.new_page()


def test_sign_in_open_a_finished_job_and_download_its_certificate(
    browser: Any, service: Service, shots: Path  # noqa: F811
) -> None:
    page = new_page(browser)
    seen: list[str] = []
    page.on("response", lambda r: seen.append(r.url))
    sign_in(page, service.base, service.auditor)
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["mu_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert session["value"] != service.auditor
    page.screenshot(path=shots / "jobs.png", full_page=True)
    page.get_by_role("link", name=service.finished_job).click()
    page.wait_for_url(f"**/console/jobs/{service.finished_job}")
    assert page.locator("#job-state").inner_text() == "succeeded"
    heatmap = page.locator("svg.heatmap")
    assert heatmap.is_visible()
    assert heatmap.locator("rect.selected").count() >= 1
    assert heatmap.bounding_box()["width"] > 200
    rows = page.locator("#scores tbody tr")
    assert rows.count() >= 2
    forget = page.locator("#scores tbody tr", has_text="forget").first.locator("td")
    assert forget.nth(2).inner_text() not in ("", "-") and forget.nth(3).inner_text() != "-"
    assert page.locator("#changes li").count() >= 1
    assert page.locator("#timeline li.done").count() == 5
    page.screenshot(path=shots / "job.png", full_page=True)
    with page.expect_download() as download:
        page.locator("#cert-json").click()
    cert = json.loads(Path(download.value.path()).read_text())
    assert cert["job_id"] == service.finished_job and cert["outcome"] == "SUCCEEDED"
    page.locator("#cert-html").click()
    page.wait_for_url("**/certificate")
    assert page.get_by_role("heading", name="Deletion certificate").is_visible()
    assert cert["certificate_sha256"] in page.content()
    page.screenshot(path=shots / "certificate.png", full_page=True)
    # The key is never in a page or a URL.
    assert not [u for u in seen if service.auditor in u]
    assert service.auditor not in page.content()
    page.context.close()


def test_pages_fit_both_widths_and_pass_axe(
    browser: Any, service: Service, shots: Path  # noqa: F811
) -> None:
    paths = ["/console/jobs", f"/console/jobs/{service.finished_job}",
             f"/console/jobs/{service.finished_job}/certificate", "/console/audit?verify=now",
             "/console/requests"]
    failures: list[str] = []
    for name, width in WIDTHS.items():
        page = new_page(browser, width, bypass_csp=True)  # axe is injected as a script
        page.goto(f"{service.base}/console/login")
        failures += [f"login@{width}: {v}" for v in serious_violations(page)]
        if overflow_px(page) > 0:
            failures.append(f"login@{width}: scrolls sideways")
        sign_in(page, service.base, service.auditor)
        for path in paths:
            page.goto(service.base + path)
            if (px := overflow_px(page)) > 0:
                failures.append(f"{path}@{width}: scrolls sideways by {px}px")
            failures += [f"{path}@{width}: {v}" for v in serious_violations(page)]
            if name == "phone" and path.endswith(service.finished_job):
                page.screenshot(path=shots / "job-phone.png", full_page=True)
        if name == "desktop":
            page.goto(f"{service.base}/console/audit?verify=now")
            page.screenshot(path=shots / "audit.png", full_page=True)
        page.context.close()
    assert failures == []


def test_reads_without_javascript(browser: Any, service: Service) -> None:  # noqa: F811
    page = new_page(browser, java_script_enabled=False)
    sign_in(page, service.base, service.requester)
    page.goto(f"{service.base}/console/jobs/{service.finished_job}")
    assert page.locator("svg.heatmap").is_visible()
    assert page.locator("#scores tbody tr").count() >= 2
    assert page.locator("#cert-html").is_visible()
    page.context.close()


def test_watch_a_running_job_progress_and_cancel_it(
    browser: Any, service: Service, shots: Path  # noqa: F811
) -> None:
    with Client(service.base, service.requester) as c:
        spec = http_spec(service.model_dir, service.forget_id, service.retain_id, 100_000)
        job = c.submit(spec)["id"]
        # Open the page once it trains: a change of stage reloads the page (new results).
        deadline = time.monotonic() + 240
        while c.get(job)["stage"] != "unlearning":
            assert time.monotonic() < deadline, c.get(job)
            time.sleep(0.3)
    page = new_page(browser)
    sign_in(page, service.base, service.requester)
    page.goto(f"{service.base}/console/jobs/{job}")
    assert page.locator("#scores").count() == 1  # the scores before, recorded by now
    page.evaluate("() => { window.__sameDocument = true; }")
    bar = "document.getElementById('progress')"
    first = page.evaluate(f"() => {bar}.value")
    page.wait_for_function(f"() => {bar}.value > {first}", timeout=120_000)
    # It changed in place (server-sent events), not by reloading the page.
    assert page.evaluate("() => window.__sameDocument === true")
    assert page.locator("#timeline li.current .name").inner_text().lower() == "unlearning"
    assert "step" in page.locator("#progress-text").inner_text()
    page.screenshot(path=shots / "job-running.png", full_page=True)
    page.get_by_role("button", name="Cancel this job").click()
    page.wait_for_function(
        "() => document.getElementById('job-state').textContent.trim() === 'cancelled'",
        timeout=120_000,
    )
    with Client(service.base, service.requester) as c:
        assert c.get(job)["state"] == "CANCELLED"
    page.context.close()


def test_another_tenants_job_is_refused(browser: Any, service: Service) -> None:  # noqa: F811
    page = new_page(browser)
    sign_in(page, service.base, service.other)
    assert service.finished_job not in page.content()
    response = page.goto(f"{service.base}/console/jobs/{service.finished_job}")
    assert response.status == 404
    assert page.get_by_role("heading", name="Job not found").is_visible()
    response = page.goto(f"{service.base}/console/jobs/{service.finished_job}/certificate")
    assert response.status == 404
    # A requester has no audit pages.
    assert page.goto(f"{service.base}/console/audit").status == 403
    page.context.close()


def test_certificate_prints_to_clean_a4_pages(
    browser: Any, service: Service, shots: Path  # noqa: F811
) -> None:
    page = new_page(browser)
    sign_in(page, service.base, service.auditor)
    page.goto(f"{service.base}/console/jobs/{service.finished_job}/certificate")
    page.emulate_media(media="print")
    # A4 at 96 dpi is 794 px wide; less the page margins (14 mm each side) ~ 688 px.
    page.set_viewport_size({"width": 688, "height": 1000})
    assert overflow_px(page) == 0
    pdf = page.pdf(format="A4", print_background=True)
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 1
    (shots / "certificate.pdf").write_bytes(pdf)
    page.context.close()


def test_the_chain_turns_red_after_an_audit_row_is_edited(
    browser: Any, service: Service, shots: Path  # noqa: F811
) -> None:
    page = new_page(browser)
    sign_in(page, service.base, service.auditor)
    page.goto(f"{service.base}/console/audit")
    page.get_by_role("button", name="Verify now").click()
    assert "intact" in page.locator("#chain-status").inner_text()
    with sqlite3.connect(service.db_path) as conn:
        conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 5")
    page.get_by_role("button", name="Verify now").click()
    status = page.locator("#chain-status")
    assert "broken" in status.inner_text() and page.locator("#first-bad").inner_text() == "5"
    colour = status.locator(".badge").evaluate("e => getComputedStyle(e).color")
    assert colour == "rgb(139, 17, 17)"  # the console's red
    page.screenshot(path=shots / "audit-broken.png", full_page=True)
    page.context.close()
