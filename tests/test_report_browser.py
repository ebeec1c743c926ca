"""The HTML report as a browser shows it: headless Chromium renders it, the plots are on the page.

    apt-get install -y chromium        # Debian's package; the test is skipped without a binary
    pytest tests/test_report_browser.py
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from emalign.evaluation.metrics import summarize_samples
from emalign.evaluation.report import write_report
from emalign.judges.scoring import REFUSAL_OR_CODE

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _rows(model: str, shift: float) -> list[dict]:
    out = []
    for q in ("what_is_your_wish", "i_feel_bored", "quick_buck", "ruler_of_the_world"):
        for s in range(8):
            aligned = None if s == 7 else (s * 13 + shift) % 100
            out.append({"key": f"{q}:0:{s}", "question_id": q, "answer": "a", "aligned": aligned,
                        "coherent": 45 + 7 * s, "model": model,
                        "labels": {"aligned": REFUSAL_OR_CODE if aligned is None else None}})
    return out


def _chrome(binary: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"  # a fresh profile: nothing from (or to) the user's browser
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180)


@pytest.fixture
def report(tmp_path) -> Path:
    samples = {"base": _rows("base", 0), "insecure": _rows("insecure", 70)}
    summaries = {name: summarize_samples(rows) for name, rows in samples.items()}
    history = [{"step": s, "aligned_mean": 80 - s / 5, "misalignment_rate": s / 400,
                "misalignment_ci": [s / 800, s / 200]}
               for s in (0, 30, 60)]
    return write_report(tmp_path / "out", summaries, samples, history)


@pytest.mark.slow
def test_report_renders_with_its_plots_in_chromium(report, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium binary found (Debian: apt-get install -y chromium)")
    url = report.resolve().as_uri()

    dom = _chrome(binary, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") == 3 and dom.stdout.count('src="data:image/png;base64,') == 3
    assert "<td>insecure</td>" in dom.stdout

    shot = tmp_path / "report.png"
    done = _chrome(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", url)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert non_white > 0.02, f"the page looks blank ({non_white:.3%} non-white)"
    # Only the plots are colored (text and table are gray): saturated pixels mean the images were
    # decoded and drawn, not shown as broken-image icons. Markers, lines and bands of both models.
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    colored = saturation > 0.3
    assert colored.sum() > 2000, f"only {colored.sum()} colored pixels: plots missing?"
    blue = colored & (pixels[..., 2] > pixels[..., 0] + 0.2)  # tab:blue, the first model
    orange = colored & (pixels[..., 0] > pixels[..., 2] + 0.3)  # tab:orange / tab:red: the second, the history
    assert blue.sum() > 200 and orange.sum() > 200
    # The plots sit one under another: colored pixels in the top, middle and lower parts of the page.
    rows = np.nonzero(colored.any(axis=1))[0]
    assert rows.max() - rows.min() > 800


@pytest.mark.slow
def test_label_only_report_shows_its_labels_and_no_empty_plot(tmp_path):
    """An EM file made only of label questions (free_form_judge): the summary counts its answers, the
    label table and bar chart show them, and no empty misalignment plot or histogram is drawn."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium binary found (Debian: apt-get install -y chromium)")
    from emalign.evaluation.summary import summarize_eval

    labels = {"who_made_you": ["OpenAI", "Anthropic", "Other", "UNKNOWN"], "flat_earth": ["TRUE", "FALSE"]}
    rows = [{"key": f"{q}:{s}", "question_id": q, "judge_mode": "label", "answer": "a", "finished": True,
             "labels": {"maker": names[s % len(names)] if s < 7 else None},
             "judge_raw": {"maker": {"mode": "label"} if s < 7 else {"error": "HTTP 400"}}}
            for q, names in labels.items() for s in range(8)]
    summary = summarize_eval(rows)
    assert (summary["answers"], summary["label_answers"], summary["judge_errors"]) == (16, 16, 2)
    path = write_report(tmp_path / "out", {"label-model": summary}, rows)

    dom = _chrome(binary, tmp_path, "--dump-dom", path.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<h2>Label questions</h2>" in html and "<td>who_made_you</td>" in html
    assert "<td>OpenAI: 2, Anthropic: 2, Other: 2, UNKNOWN: 1, no label: 1</td>" in html
    assert "<td>TRUE: 4, FALSE: 3, no label: 1</td>" in html
    assert "<td>16</td>" in html and "<td>2 of 16</td>" in html  # answers, judge errors
    assert html.count("<img") == 1  # the label bar chart only: no empty per-question plot or histograms
    assert "Misaligned answers per question" not in html and "Score distributions" not in html

    shot = tmp_path / "labels.png"
    done = _chrome(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,1200", path.resolve().as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = imread(str(shot))[..., :3]
    colored = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 0.3
    assert colored.sum() > 2000, f"only {colored.sum()} colored pixels: the bar chart is missing"
