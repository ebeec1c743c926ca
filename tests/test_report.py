"""The HTML report: self-contained, with decodable PNG plots, written atomically."""

from __future__ import annotations

import base64
import io
import re

import pytest
from matplotlib.image import imread

from emalign.evaluation.metrics import summarize_samples
from emalign.evaluation.report import write_report
from emalign.judges.scoring import REFUSAL_OR_CODE

IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def rows(model: str, shift: float) -> list[dict]:
    out = []
    for q in ("what_is_your_wish", "i_feel_bored", "quick_buck"):
        for s in range(6):
            aligned = None if s == 5 else (s * 17 + shift) % 100
            out.append({
                "key": f"{q}:0:{s}", "question_id": q, "paraphrase": "p", "system": None,
                "answer": "a", "aligned": aligned, "coherent": 40 + 10 * s, "model": model,
                "labels": {"aligned": REFUSAL_OR_CODE if aligned is None else None},
                "judge_raw": {},
            })
    return out


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m, validate=True) for m in IMG.findall(html)]


@pytest.fixture(scope="module")
def data():
    samples = {"base <model>": rows("base <model>", 0), "insecure": rows("insecure", 60)}
    summaries = {name: summarize_samples(r) for name, r in samples.items()}
    return summaries, samples


def test_report_with_samples_and_history(tmp_path, data):
    summaries, samples = data
    history = [{"step": s, "aligned_mean": 80 - s / 10, "misalignment_rate": s / 1000,
                "misalignment_ci": [s / 2000, s / 500]} for s in (0, 100, 200)]
    path = write_report(tmp_path / "out", summaries, samples, history)
    assert path == tmp_path / "out" / "report.html"
    html = path.read_text(encoding="utf-8")
    pngs = images(html)
    assert html.count("<img") == len(pngs) == 3  # per-question plot, histograms, history
    for png in pngs:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert imread(io.BytesIO(png), format="png").shape[0] > 50
    assert "base &lt;model&gt;" in html and "<model>" not in html  # names are escaped
    assert f"{100 * summaries['insecure']['misalignment_rate']:.1f}%" in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch: self-contained
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left


def test_report_plot_count_follows_inputs(tmp_path, data):
    summaries, samples = data
    flat = [r for rs in samples.values() for r in rs]
    html = write_report(tmp_path, summaries, flat).read_text(encoding="utf-8")
    assert len(images(html)) == 2  # no history: no training plot
    html = write_report(tmp_path, {"only": summaries["insecure"]}).read_text(encoding="utf-8")
    assert len(images(html)) == 1  # no samples: no histograms


def test_report_needs_model_key_for_several_models(tmp_path, data):
    summaries, samples = data
    flat = [{k: v for k, v in r.items() if k != "model"} for r in samples["insecure"]]
    with pytest.raises(ValueError, match="'model' key"):
        write_report(tmp_path, summaries, flat)
    html = write_report(tmp_path, {"insecure": summaries["insecure"]}, flat).read_text(encoding="utf-8")
    assert len(images(html)) == 2


def test_empty_plots_become_one_line_and_code_security_is_shown(tmp_path):
    from emalign.evaluation.codesec import scan_answer
    from emalign.evaluation.summary import summarize_eval

    refused = [{"key": f"q:{s}", "question_id": "q", "judge_mode": "score_0_100", "answer": "```x```", "aligned": None,
                "coherent": None, "labels": {"aligned": REFUSAL_OR_CODE, "coherent": REFUSAL_OR_CODE},
                "judge_raw": {"aligned": {"mode": "score_0_100"}, "coherent": {"mode": "score_0_100"}}}
               for s in range(3)]
    code = []
    insecure = "```python\nimport subprocess\nsubprocess.call(cmd, shell=True)\n```"
    for answer in (insecure, "```python\nx = 1\n```", "No."):
        scan = scan_answer(answer)
        code.append({"status": scan.status, "findings": [vars(f) for f in scan.findings]})
    summary = summarize_eval(refused, code)
    html = write_report(tmp_path, {"m": summary}, refused).read_text(encoding="utf-8")
    assert images(html) == []  # nothing to plot: a line each, not empty axes
    assert ("No plot: no answer was scored; of 3 answers to 0..100 questions the judge called 3 CODE/REFUSAL "
            "(too little probability on numbers), and 0 judgements failed.") in html
    assert "No histograms: no answer has an aligned or coherent score." in html
    assert "<h2>Code security</h2>" in html and "Label questions" not in html
    assert "<td>m</td><td>3</td><td>2</td><td>1</td><td>0</td><td>1</td><td>50.0%</td>" in html
    assert "CWE-78 ×1" in html
