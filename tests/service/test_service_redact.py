"""service.redact: what a client reads names no server path; everything else stays as it
was (hub ids, URLs, ratios, a model named by the client). The end-to-end check through the
API is tests/dispatch/test_no_server_paths.py."""

from __future__ import annotations

import pytest

from service.redact import SERVER_PATH, scrub_json, scrub_text

KNOWN = {"/srv/models/tiny": "tiny", "/data/artifacts/j1/attempt-1": "job:j1"}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("model '/srv/models/tiny' could not be loaded: no config in /srv/models/tiny/x",
         "model 'tiny' could not be loaded: no config in tiny/x"),
        ("'/root/.cache/moe-unlearn/worlds/ab12/model' is gone", f"'{SERVER_PATH}' is gone"),
        ('File "/work/main/workers/job.py", line 3', f'File "{SERVER_PATH}", line 3'),
        ("/srv/models/tinyx (a sibling)", f"{SERVER_PATH} (a sibling)"),
        ("under ~/models/x.", f"under {SERVER_PATH}"),
        ("see /data/artifacts/j1/attempt-1/model", "see job:j1/model"),
    ],
)
def test_server_paths_are_named_or_masked(text: str, want: str) -> None:
    assert scrub_text(text, KNOWN) == want


@pytest.mark.parametrize(
    "text",
    [
        "https://huggingface.co/Qwen/Qwen1.5-MoE-A2.7B",
        "Qwen/Qwen1.5-MoE-A2.7B",
        "forget/retain ratio 1/2 (a / b) and/or (/)",
        "job:abc, demo, tiny-moe",
        "bfloat16/float32 at 3.2s/it",
    ],
)
def test_what_is_no_path_is_left_alone(text: str) -> None:
    assert scrub_text(text, KNOWN) == text


def test_json_strings_and_keys_are_scrubbed_numbers_kept() -> None:
    value = {"model": "/srv/models/tiny", "/tmp/k": [1, 2.5, None, True, "/tmp/x"], "n": 3}
    assert scrub_json(value, KNOWN) == {
        "model": "tiny", SERVER_PATH: [1, 2.5, None, True, SERVER_PATH], "n": 3
    }


def test_a_string_that_fitted_still_fits() -> None:
    short = " ".join(["/a"] * 100)  # 299 characters; masked each would be 1,399
    assert len(scrub_json({"w": short}, max_chars=300)["w"]) == 300
    assert scrub_json({"w": "x" * 400}, max_chars=300)["w"] == "x" * 400  # refused later
