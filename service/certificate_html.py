"""The deletion certificate as a page a person can read, print and file (Jinja2 template
`service/templates/certificate.html`). The same page answers
`GET /v1/jobs/{id}/certificate?format=html` and the console's certificate link.

`certificate_view(cert)` turns the certificate's JSON data into what the page shows: a
headline (what was deleted, for whom, when, the outcome, forget accuracy before -> after,
utility kept, robustness verdicts and signature status when the certificate carries them),
scores with before and after side by side, and settings as key-value lists. Every value is
escaped by the template (autoescape); nothing here reads the database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).resolve().parent / "templates"
VERDICTS = ("pass", "fail", "not_run")


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,  # optional fields may be absent
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_number
    env.filters["plain"] = plain_value
    env.filters["when"] = fmt_when
    env.filters["label"] = lambda v: str(v).replace("_", " ")
    return env


def fmt_number(v: Any, digits: int = 3) -> str:
    """A score for people: 0.912 rather than 0.91234567; '-' when missing."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 10:
            return str(int(v))  # a count (questions, tokens), not a score
        return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.4g}"
    return str(v)


def plain_value(v: Any) -> str:
    """A setting value as text: lists joined by commas, None as 'default'."""
    if v is None:
        return "default"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return ", ".join(plain_value(x) for x in v) or "(none)"
    return str(v)


def flatten_settings(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested settings -> ('seuf.top_m', 1) pairs, in their given order."""
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out.extend(flatten_settings(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return [(prefix or "value", value)]


def settings_groups(method: dict[str, Any]) -> list[dict[str, Any]]:
    """Settings as titled key-value lists: plain values (algorithm, scope) form the first
    group, 'method'; each nested block (seuf, training...) its own, flattened."""
    plain = [(k, v) for k, v in method.items() if v is not None and not isinstance(v, dict)]
    groups = [{"name": "method", "items": plain}] if plain else []
    groups += [{"name": k, "items": flatten_settings(v)} for k, v in method.items()
               if isinstance(v, dict) and v]
    return groups


def score_rows(scores: dict[str, Any]) -> list[dict[str, Any]]:
    """Before and after of each (task, metric) on one row, with the change."""
    before = scores.get("before") or {}
    after = scores.get("after") or {}
    keys: list[tuple[str, str]] = []
    for phase in (before, after):
        for task, metrics in phase.items():
            for metric in metrics:
                if (task, metric) not in keys:
                    keys.append((task, metric))
    rows = []
    for task, metric in keys:
        b = (before.get(task) or {}).get(metric)
        a = (after.get(task) or {}).get(metric)
        change = a - b if isinstance(a, int | float) and isinstance(b, int | float) else None
        rows.append({"task": task, "metric": metric, "before": b, "after": a, "change": change})
    return rows


MAIN_TASKS = ("forget", "utility", "retain")
SIDE_METRICS = ("topic",)  # the forget topic's index: a label, not a score


def split_scores(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(forget / utility / retain measures, everything else: per topic, lm-eval tasks,
    counts); all rows are main when none is a forget, utility or retain measure."""
    main = [r for r in rows if r["task"] in MAIN_TASKS and r["metric"] not in SIDE_METRICS]
    if not main:
        return rows, []
    return main, [r for r in rows if r not in main]


def _headline_score(
    rows: list[dict[str, Any]], sides: tuple[str, ...], accuracy: bool
) -> dict[str, Any] | None:
    """The forget (or utility) score of the headline: with `accuracy`, an accuracy metric
    only (task named exactly like a side first, metric 'accuracy' first); else any metric
    of those tasks (shown without a better/worse direction)."""
    candidates = [r for r in rows if r["task"].startswith(sides)]
    candidates.sort(key=lambda r: (r["task"] not in sides, r["metric"] != "accuracy", r["metric"]))
    for r in candidates:
        is_acc = "accuracy" in r["metric"] and "paraphrase" not in r["metric"]
        if is_acc or not accuracy:
            return r
    return None


def fmt_when(v: Any) -> str:
    """An ISO timestamp for people: 2026-12-05 18:44:56 UTC (the JSON keeps the exact one)."""
    if v is None:
        return "-"
    try:
        d = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
    except ValueError:
        return str(v)
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return d.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def robustness_checks(cert: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The robustness verdicts the certificate carries (`service.proof`: a list of
    {check, verdict, threshold, metrics, reason}); None when it carries none."""
    raw = cert.get("robustness")
    if not isinstance(raw, list):
        return None
    out = []
    for x in raw:
        if not isinstance(x, dict):
            continue
        verdict = str(x.get("verdict", "not_run"))
        metrics = x.get("metrics") if isinstance(x.get("metrics"), dict) else {}
        out.append({
            "name": str(x.get("check") or "check").replace("_", " "),
            "verdict": verdict if verdict in VERDICTS else "not_run",
            "reason": x.get("reason"),
            "threshold": x.get("threshold"),
            "details": {str(k): v for k, v in metrics.items() if isinstance(v, int | float)},
        })
    return out


def fingerprint_of(public_key: Any) -> str | None:
    """The fingerprint of a certificate's or checkpoint's public key, as the service's
    signing module computes it (None without signing, or for a malformed key)."""
    try:
        from service import signing
    except ImportError:
        return None
    fp = getattr(signing, "fingerprint_of_b64", None)
    return fp(str(public_key or "")) if fp else None


def signature_status(cert: dict[str, Any]) -> dict[str, Any]:
    """What the page says about the signature: absent (signing not available), or valid /
    not valid as the service's own offline check (`moe-unlearn certificate verify`) finds,
    with the algorithm, key id and fingerprint."""
    sig = cert.get("signature")
    if not isinstance(sig, dict):
        return {"signed": False}
    valid: bool | None = None
    reason: str | None = None
    try:
        from service import signing

        check = signing.verify_document(cert)
        valid, reason = bool(check.valid), check.reason
    except (ImportError, AttributeError):
        pass  # no verifier here: show what the certificate states
    return {
        "signed": True,
        "valid": valid,
        "reason": reason,
        "alg": sig.get("alg"),
        "key_id": sig.get("key_id"),
        "fingerprint": fingerprint_of(sig.get("public_key")),
        "public_key": sig.get("public_key"),
        "value": sig.get("value"),
    }


def corpus_rows(cert: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for role in ("forget", "retain"):
        c = cert.get(f"{role}_corpus")
        if not c:
            continue
        if c.get("source") == "demo":
            what = f"the demo world's built-in {c.get('split')} split (no upload, so no hash)"
        elif c.get("source") == "local_file":
            what = "a file on the server (not hashed by the service)"
        else:
            what = f"uploaded corpus, {plain_value(c.get('format'))}"
        rows.append({"role": role, "what": what, **c})
    return rows


def retain_overlap(cert: dict[str, Any]) -> dict[str, Any] | None:
    """The retain routing overlap block ({overall, from_target, per_layer}) when the
    certificate carries one with numbers."""
    raw = cert.get("routing_overlap_retain")
    if not isinstance(raw, dict):
        return None
    per = raw.get("per_layer") if isinstance(raw.get("per_layer"), dict) else {}
    return {
        "overall": raw.get("overall"),
        "from_target": raw.get("from_target"),
        "per_layer": [(str(k), v) for k, v in per.items() if isinstance(v, int | float)],
    }


def certificate_view(cert: dict[str, Any]) -> dict[str, Any]:
    """Everything the template shows, derived from the certificate's JSON data."""
    rows = score_rows(cert.get("scores") or {})
    forget = cert.get("forget_corpus") or {}
    if forget.get("sha256"):
        deleted = f"an uploaded corpus of {plain_value(forget.get('records'))} records"
    elif forget.get("source") == "demo":
        deleted = "the demo world's forget topic"
    else:
        deleted = "a corpus read from a server file"
    settings = settings_groups(cert.get("method") or {})
    return {
        "cert": cert,
        "deleted": deleted,
        "forget_score": _headline_score(rows, ("forget",), True),
        "forget_other": _headline_score(rows, ("forget",), False),
        "utility_score": _headline_score(rows, ("utility", "retain"), True),
        "utility_other": _headline_score(rows, ("utility", "retain"), False),
        "score_rows": split_scores(rows)[0],
        "other_rows": split_scores(rows)[1],
        "settings": settings,
        "corpora": corpus_rows(cert),
        "robustness": robustness_checks(cert),
        "signature": signature_status(cert),
        "overlap": sorted((cert.get("routing_overlap") or {}).items()),
        "retain_overlap": retain_overlap(cert),
    }


def render(cert: dict[str, Any]) -> str:
    """The certificate page (self-contained: its style is inline, no script, no request)."""
    return environment().get_template("certificate.html").render(**certificate_view(cert))
