"""The HTML reports people read: noise dropped, code folded, contents and index link present, tables whole,
checked on the produced markup, in headless chromium, and on every report in reports/ the new exporter made."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pandas as pd
import pytest
from bs4 import BeautifulSoup
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from llmopt.paths import REPO_ROOT
from llmopt.report.html import GENERATOR, MAX_COLUMNS, index_html, notebook_html, table_shape

LONG = "0.072x the estimate: the cache pays off only past the prompt length where attention dominates the step"
PNG_1X1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
NOISE = ("TqdmWarning", "IProgress", "USDT", "profiler_start", "PosixPath(", "it/s]")


def executed_notebook():
    """A small executed notebook with every kind of output a headless run leaves behind."""
    wide = pd.DataFrame([[f"v{r}.{c}" for c in range(25)] for r in range(3)], columns=[f"col{c}" for c in range(25)])
    wide["verdict"] = LONG
    small = pd.DataFrame({"prompt_tokens": [16, 64], "verdict": [LONG, "ok"]})
    noisy = [
        new_output("stream", name="stderr", text="/venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: "
                   "IProgress not found. Please update jupyter and ipywidgets.\n  from .autonotebook import tqdm\n"),
        new_output("stream", name="stderr", text="\rgeneration:  57%|█████▋    | 8/14 [00:13<00:14,  2.35s/it]"),
        new_output("stream", name="stderr", text="USDT:2026-11-27 23:13:37 8819:8819 Handler.cpp:52] profiler_start\n"),
        new_output("stream", name="stdout", text="attention op:  33%|███▎      | 3/9 [00:00<00:00, 26.76it/s]\n"
                   "measured 42 tokens\n"),
        new_output("display_data", data={"text/plain": "loading: 100%|██████████| 272/272 [00:00<00:00, 7569.99it/s]"}),
        new_output("display_data", data={"text/plain": "bench:   0%|          | 0/3 [00:00<?, ?it/s]",
                                         "application/vnd.jupyter.widget-view+json": {"model_id": "e18"}}),
    ]
    return new_notebook(cells=[
        new_markdown_cell("# 99 · A test report\nWhat this measures."),
        new_markdown_cell("## Measurement\nRounds of both engines."),
        new_code_cell("results = measure()", outputs=noisy + [
            new_output("execute_result", data={"text/html": small.to_html(), "text/plain": "small"},
                       execution_count=1)]),
        new_markdown_cell("### Wide table"),
        new_code_cell("wide", outputs=[
            new_output("execute_result", data={"text/html": wide.to_html(), "text/plain": "wide"}, execution_count=2)]),
        new_markdown_cell("## Measurement\nA second section of the same name."),
        new_code_cell("plot()", outputs=[new_output("display_data", data={"image/png": PNG_1X1, "text/plain": "fig"})]),
        new_code_cell("harness.save_headline(...)", outputs=[
            new_output("execute_result", data={"text/plain": "PosixPath('/tmp/res/headline_99_test.json')"},
                       execution_count=3)]),
    ])


def check_report_dom(page: str, long_string: str | None = None) -> BeautifulSoup:
    """The checks every report passes: no noise, code folded, TOC anchors resolve, link to the index, no CDN."""
    soup = BeautifulSoup(page, "html.parser")
    outputs = " ".join(o.get_text() for o in soup.select(".jp-OutputArea-output"))
    for noise in NOISE:
        assert noise not in outputs, f"{noise!r} in the outputs"
    assert not soup.select("[data-mime-type='application/vnd.jupyter.stderr']")
    problems = [block.get_text(" ", strip=True) for block in soup.select(".llmopt-plot-problem")]
    assert not problems, f"plots failed the figure checks: {problems}"
    if long_string:
        assert long_string in soup.get_text(), "a long cell was truncated"
    assert "..." not in " ".join(td.get_text() for td in soup.select(".jp-OutputArea-output td"))
    assert soup.find("a", href="index.html") is not None, "no link back to the index"
    ids = {tag["id"] for tag in soup.find_all(id=True)}
    toc = soup.select("nav.llmopt-toc a[href^='#']")
    assert toc, "no table of contents"
    assert len(ids) == len(soup.find_all(id=True)), "duplicate ids"
    for link in toc:
        assert link["href"][1:] in ids, f"TOC link {link['href']} has no target"
    code = soup.select(".jp-CodeCell .jp-InputArea")
    assert code, "no code in the report"
    for area in code:
        details = area.find_parent("details")
        assert details is not None and not details.has_attr("open"), "code shown by default"
    for tag in soup.find_all(["script", "link", "img"]):
        url = tag.get("src") or tag.get("href") or ""
        assert not url.startswith(("http:", "https:", "//")), f"external asset {url}"
    return soup


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    page = notebook_html(executed_notebook(), "99 · A test report", environment={"cpu": "Test CPU", "cpu_count": 2})
    path = tmp_path_factory.mktemp("report") / "99_test.html"
    path.write_text(page)
    return path


def test_report_drops_noise_folds_code_and_links_back(report):
    soup = check_report_dom(report.read_text(), LONG)
    assert soup.find("meta", attrs={"name": "generator", "content": GENERATOR})
    assert "measured 42 tokens" in soup.get_text(), "stdout lost with the progress bar in it"
    assert [a.get_text() for a in soup.select("nav.llmopt-toc a")] == ["Measurement", "Wide table", "Measurement"]
    assert soup.select_one("footer").get_text().count("Test CPU") >= 1


def test_wide_tables_collapse_and_small_ones_stay_open(report):
    soup = BeautifulSoup(report.read_text(), "html.parser")
    tables = soup.select(".jp-OutputArea-output table")
    assert len(tables) == 2
    small, wide = tables
    assert small.find_parent("details") is None
    assert table_shape(wide)[1] > MAX_COLUMNS
    summary = wide.find_parent("details", class_="llmopt-table").summary.get_text()
    assert "3 rows" in summary and "27 columns" in summary  # index column + 25 + verdict


def test_index_shows_machine_cards_and_how_to_read():
    cards = [{"name": "01_kv", "href": "01_kv.html", "title": "KV cache", "key_figure": "3.1x faster decode",
              "verdict": LONG, "table": {"columns": ["tokens", "speedup"], "data": [[64, 1.23456], [8192, 31.5]]},
              "generated": "2026-01-01 10:00 UTC", "git_revision": "abc123", "ran_on": "Test CPU (2 threads)"}]
    env = {"cpu": "Test CPU", "cpu_isa": "x86-64-v3", "cpu_count": 2, "l3_cache": "32 MiB", "cpu_kernels": "AVX2"}
    soup = BeautifulSoup(index_html(cards, env), "html.parser")
    text = soup.get_text(" ")
    for expected in ("x86-64-v3", "32 MiB", "AVX2", "95%", "estimate", LONG, "1.23", "abc123"):
        assert expected in text
    assert soup.select_one(".card a")["href"] == "01_kv.html"
    assert "1.23456" not in text


def chromium_or_skip() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "chromium not installed (apt-get install chromium): the rendered-DOM checks did not run"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must install it (.ci/run does)")
    pytest.skip(reason)


def chromium(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = chromium_or_skip()
    rendered = chromium(browser, tmp_path, "--dump-dom", report.as_uri()).stdout
    soup = check_report_dom(rendered, LONG)
    assert soup.select_one("#llmopt-toggle-code") is not None
    shot = tmp_path / "report.png"
    chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


PUBLISHED = sorted((REPO_ROOT / "reports").glob("[0-9][0-9]_*.html"))


def check_images(page: BeautifulSoup, report_path) -> None:
    for img in page.find_all("img"):
        src = img.get("src", "")
        if src.startswith("data:"):
            header, _, data = src.partition(",")
            assert data and base64.b64decode(data), f"empty embedded image in {report_path.name}"
        else:
            assert (report_path.parent / src).is_file(), f"{report_path.name}: missing plot {src}"


@pytest.mark.parametrize("path", PUBLISHED, ids=[p.stem for p in PUBLISHED])
def test_published_reports(path):
    page = path.read_text()
    soup = BeautifulSoup(page, "html.parser")
    if soup.find("meta", attrs={"name": "generator", "content": GENERATOR}) is None:
        pytest.skip(f"{path.name} was made by the old exporter (no <meta name=generator content='{GENERATOR}'>); "
                    "`make report` regenerates it")
    check_report_dom(page)
    check_images(soup, path)
