"""The HTML site: the report's index.html and the feature browser, built by ``saex report --out --features`` from a
tiny matrix run (tiny random Llama, magnitude-pruned M_c; original, retrained and a Wanda-pruned SAE; reconstruction
and transfer), its numbers checked against activations recomputed directly, and the pages opened from file:// in
headless Chromium (Debian's chromium and chromium-driver, driven by selenium).

With ``SAEX_SITE=<folder>`` the browser test opens that site instead (e.g. one made by ``saex report smoke --out
<folder> --features`` on the real model), and with ``SAEX_SCREENSHOTS=<folder>`` it also saves its screenshots
there: docs/REPORT.md's pictures are made that way."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from saex.analysis.feature_data import BINS
from saex.analysis.survival import SurvivalParams, classify
from saex.cli import main
from saex.config.matrix import BASE, expand, resolve_matrix
from saex.config.registry import Registry, load_registry
from saex.model.hookpoints import parse_hook
from saex.plugin.manager import load_plugins
from saex.report.browser import BYTE_LEVEL, CLASSES, Scope, Selection, TokenText, gather, scopes, top_contexts
from saex.report.columns import header
from saex.report.site import SitePart, tooltip, tooltips, write_site
from saex.run.outputs import declared_outputs
from saex.run.runner import Runner
from saex.storage.cache import Cache
from saex.storage.results import ResultsStore
from saex.testing import DOC_MODULES, module_docs

pytestmark = pytest.mark.usefixtures("single_thread_module")

MATRIX = "site-t"
HOOK = "layers.1.resid_post"
SELECTION = Selection(damaged=3, intact=3, random=3)
SELECTION_ARGS = [f"--{name.replace('_', '-')}={value}" for name, value in vars(SELECTION).items()]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@dataclass
class Built:
    root: Path
    registry_file: Path
    store: Path
    home: Path
    registry: Registry

    def runner(self) -> Runner:
        plugins = load_plugins(entry_points=False)
        return Runner(
            plugins, self.registry, ResultsStore(Path(":memory:")), Cache(self.home / "cache"), progress=False
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("site")
    corpus = root / "corpus"
    corpus.mkdir()
    for index, (name, doc) in enumerate(zip(DOC_MODULES, module_docs())):
        (corpus / f"{index:02d}_{name}.txt").write_text(doc)
    small = {"plugin": "topk", "params": {"expansion_factor": 2, "k": 4}}
    registry = {
        "models": {"site-m": {"plugin": "tiny-llama", "params": {"num_hidden_layers": 2}}},
        "corpora": {"site-docs": {"plugin": "files", "params": {"paths": [str(corpus / "*.txt")]}}},
        "compressions": {"site-mag": {"plugin": "magnitude", "params": {"sparsity": 0.5}}},
        "pruners": {"site-wanda": {"plugin": "wanda"}},
        "saes": {"site-small": small | {"training": {"tokens": 1024, "batch_size": 256, "lr": 0.003}}},
        "metrics": {"site-rec": {"plugin": "reconstruction"}, "site-transfer": {"plugin": "transfer"}},
        "matrices": {
            MATRIX: {
                "models": ["site-m"],
                "corpus": "site-docs",
                "compressions": ["site-mag"],
                "hooks": [HOOK],
                "saes": ["site-small"],
                "sources": ["original", "retrained", "pruned:site-wanda@0.5"],
                "metrics": ["site-rec", "site-transfer"],
                "block_size": 32,
                "device": "cpu",
                "tokens": {"train": 1024, "calibration": 64, "eval": 512},
            }
        },
    }
    path = root / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))
    plugins = load_plugins(entry_points=False)
    loaded = load_registry([path], plugins)
    store = ResultsStore(root / "results.sqlite")
    Runner(plugins, loaded, store, Cache(root / "home" / "cache"), progress=False, log=lambda m: None).run(MATRIX)
    store.close()
    return Built(root, path, root / "results.sqlite", root / "home", loaded)


def cli(built: Built, *argv: str) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAEX_HOME", str(built.home))
        return main([*argv, "--registry", str(built.registry_file), "--store", str(built.store)])


@pytest.fixture(scope="module")
def site(built: Built) -> Path:
    """The whole site: ``saex report MATRIX --out DIR --features`` (3 damaged, 3 intact, 3 random pages)."""
    out = built.root / "out"
    assert cli(built, "report", MATRIX, "--out", str(out), "--features", *SELECTION_ARGS) == 0
    return out


@pytest.fixture(scope="module")
def browser(built: Built, site: Path):
    """The feature browser's data of the site's one scope, as ``gather`` reads it (from the cache)."""
    runner = built.runner()
    rows = {r.key: r for r in ResultsStore.existing(built.store).rows(MATRIX)}
    matrix = resolve_matrix(runner.registry, MATRIX)
    (scope,) = scopes(runner, matrix, rows)
    session = runner.open_model(matrix, scope.model, torch.device("cpu"))
    return gather(runner, session, rows, scope, SELECTION), runner, session


def latents_js(site: Path) -> dict:
    (path,) = (site / "features").glob("*/latents.js")
    text = path.read_text()
    return json.loads(text.removeprefix("window.SAEX_LATENTS = ").rstrip().removesuffix(";"))


@torch.no_grad()
def direct_activations(browser_data) -> tuple[torch.Tensor, torch.Tensor]:
    """The original SAE's latent activations [n_tokens, d_sae] on M and on M_c, encoded in one go."""
    _, runner, session = browser_data
    artifacts, hook = session.artifacts, parse_hook(HOOK)
    cells = expand(MATRIX, runner.registry.matrix(MATRIX))
    reference = next(c for c in cells if c.scored_on != BASE and c.source == "original")
    target = session.target(reference, runner.registry)
    sae = runner.sae_artifact(reference, artifacts, target, hook).sae
    on_m = torch.cat(list(artifacts.activations(artifacts.base, "eval", hook).iter_batches(100_000)))
    on_mc = torch.cat(list(artifacts.activations(target, "eval", hook).iter_batches(100_000)))
    return sae.encode(on_m), sae.encode(on_mc)


# --- the report's page -------------------------------------------------------------------------------------


class Headers(HTMLParser):
    """Every table header of a page: (table classes, text, title or None)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str | None]] = []
        self.table, self.open = "", None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.table = dict(attrs).get("class") or ""
        elif tag == "th":
            self.open = ["", dict(attrs).get("title")]

    def handle_data(self, data: str) -> None:
        if self.open is not None:
            self.open[0] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "th" and self.open is not None:
            self.found.append((self.table, self.open[0].strip(), self.open[1]))
            self.open = None


def headers_of(html: str) -> list[tuple[str, str, str | None]]:
    parser = Headers()
    parser.feed(html)
    return parser.found


def test_report_page_shows_declared_headers_summary_and_every_figure(site: Path) -> None:
    html = (site / "index.html").read_text()
    outputs = declared_outputs(load_plugins(entry_points=False))
    ev = outputs["explained_variance"]
    found = headers_of(html)
    shown = header("explained_variance", outputs)
    assert (("data", shown, tooltip(ev)) in found) and (("data summary", shown, tooltip(ev)) not in found)
    summary = [(text, title) for table, text, title in found if table == "data summary"]
    assert (shown, tooltip(ev) + "; (Δ …): minus the same SAE on M") in summary
    assert all(title for _, title in summary)  # every header of the summary says what it holds
    declared = tooltips(outputs)
    assert sum(text in declared for _, text, _ in found) >= 20
    assert all(title == declared[text] for table, text, title in found if table == "data" and text in declared)
    assert html.count('class="data') >= 6  # report tables and the summary, sortable and filterable
    assert "Summary per hook and compression" in html and f"{HOOK} · site-mag · SAE site-small" in html
    assert 'href="features/index.html"' in html
    for png in site.glob("*.png"):  # every figure of report.md is on the page
        assert f'src="{png.name}"' in html
    specs = re.findall(r'<script type="application/json" id="(plot-[^"]+)">', html)
    assert len(specs) == 2  # the transfer gap and the every-cell explorer, interactive


def test_report_page_shows_failed_cells_with_their_whole_error(built: Built, tmp_path: Path) -> None:
    rows = list(ResultsStore.existing(built.store).rows(MATRIX))
    failing = rows[-1]
    failing.status, failing.error = "failed", "RuntimeError: the splice broke\nsecond line of the error"
    failing.details["traceback"] = "Traceback (most recent call last):\n  File x, line 1"
    outputs = declared_outputs(load_plugins(entry_points=False))
    write_site(tmp_path, [SitePart(f"matrix {MATRIX}", rows, "")], outputs)
    html = (tmp_path / "index.html").read_text()
    assert "Failed cells (1)" in html
    assert "RuntimeError: the splice broke\nsecond line of the error</pre>" in html
    assert "Traceback (most recent call last):" in html


# --- the feature browser's numbers -------------------------------------------------------------------------


def test_feature_browser_has_one_page_per_selected_latent(site: Path, browser) -> None:
    b, _, _ = browser
    data = latents_js(site)
    assert len(data["rows"]) == b.latents.d_sae == 128  # every latent in the index
    assert [row[0] for row in data["rows"]] == list(range(128))
    assert {int(j) for j in data["pages"]} == set(b.chosen)
    assert sorted(b.chosen.values()).count("damaged") == 3 and list(b.chosen.values()).count("random") == 3
    folder = next((site / "features").glob("*/latents.js")).parent
    assert sorted(p.name for p in folder.glob("latent-*.html")) == sorted(f"latent-{j}.html" for j in b.chosen)
    classes = {row[0]: row[1] for row in data["rows"]}
    for j, reason in b.chosen.items():
        assert data["rows"][j][2] == reason
        page = (folder / f"latent-{j}.html").read_text()
        assert f"Latent {j} · " in page and classes[j] in CLASSES


def test_survival_values_are_the_cells_and_match_the_same_definitions_recomputed(built: Built, browser) -> None:
    b, runner, session = browser
    assert b.stored  # read from the cell (saex.analysis.latent_store), not recomputed
    metrics = runner.registry.matrix_components(MATRIX, "metrics")
    params = next(m.params for m in metrics if isinstance(m.params, SurvivalParams))
    assert torch.equal(classify(b.latents.tensors, params).long(), b.classes)
    for name in ("density_m", "density_mc", "act_corr", "top_overlap"):
        torch.testing.assert_close(b.latents.tensors[name], b.values[name].double(), equal_nan=True)
    # rows written before per-latent tensors were stored: the same classes and pages, computed here
    rows = {r.key: r for r in ResultsStore.existing(built.store).rows(MATRIX)}
    for row in rows.values():
        row.details.pop("per_latent", None)
    older = gather(runner, session, rows, b.scope, SELECTION)
    assert not older.stored and torch.equal(older.classes, b.classes) and older.chosen == b.chosen
    for one_to_one, best in zip(b.matches, older.matches):  # the best cosine is at least the partner's
        assert one_to_one.source == best.source and one_to_one.how != best.how
        kept = ~one_to_one.cosine.isnan()
        assert kept.sum() > 100 and (best.cosine[kept] >= one_to_one.cosine[kept] - 1e-5).all()


def test_contexts_match_activations_recomputed_directly(browser) -> None:
    b, _, _ = browser
    f_m, f_mc = direct_activations(browser)
    t = b.contexts.tensors
    assert len(f_m) == b.latents.n_tokens == len(b.windows.positions)
    for column, j in enumerate(t["latents"].tolist()):
        for model, f in (("m", f_m), ("mc", f_mc)):
            found = top_contexts(b.latents, j, model)
            expected = f[:, j].topk(len(found)).values
            torch.testing.assert_close(torch.tensor([v for v, _ in found]), expected)
            for value, row in found:  # each context is ranked by the activation at its own token
                assert f[row, j].item() == pytest.approx(value, rel=1e-5)
                window = b.windows.window(row)
                assert window.start // 32 == (window.stop - 1) // 32  # never crosses a block
        for model, f in (("m", f_m), ("mc", f_mc)):
            torch.testing.assert_close(t[f"window_{model}"][:, column], f[t["rows"], j], rtol=1e-5, atol=1e-6)


def test_histograms_add_up_to_the_eval_token_count(browser) -> None:
    b, _, _ = browser
    f_m, f_mc = direct_activations(browser)
    t = b.contexts.tensors
    for column, j in enumerate(t["latents"].tolist()):
        peak = float(t["hist_max"][column])
        assert peak == pytest.approx(max(f_m[:, j].max().item(), f_mc[:, j].max().item()), rel=1e-5)
        for model, f in (("m", f_m), ("mc", f_mc)):
            counts = t[f"hist_{model}"][column]
            assert int(counts.sum()) == b.latents.n_tokens == 496
            assert int(counts[0]) == int((f[:, j] == 0).sum())
            edges = torch.linspace(0, peak, BINS + 1)
            inside = [int(((f[:, j] > lo) & (f[:, j] <= hi)).sum()) for lo, hi in itertools.pairwise(edges)]
            assert abs(sum(abs(a - c) for a, c in zip(counts[1:].tolist(), inside))) <= 2  # float edges


class Pieces:
    """A tokenizer of the two methods the browser reads, each token a run of bytes: byte-level BPE (GPT-2's
    alphabet) or, with ``fallback``, SentencePiece's byte tokens (``<0xE2>``) for single bytes."""

    def __init__(self, pieces: list[bytes], fallback: bool = False):
        self.pieces, self.fallback = pieces, fallback
        self.alphabet = {byte: char for char, byte in BYTE_LEVEL.items()}

    def decode(self, ids: list[int], clean_up_tokenization_spaces: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, token: int) -> str:
        piece = self.pieces[token]
        if self.fallback and len(piece) == 1 and piece[0] >= 0x80:
            return f"<0x{piece[0]:02X}>"
        return piece.decode() if self.fallback else "".join(self.alphabet[b] for b in piece)


@pytest.mark.parametrize("fallback", [False, True], ids=["byte-level", "byte-fallback"])
def test_byte_tokens_are_shown_as_bytes_and_split_characters_whole(fallback: bool) -> None:
    pieces = [b"It", b"\xe2\x80", b"\x99s", b" \xe6", b"\x97", b"\xa5", b"\n", b"\xff", b""]
    if fallback:  # SentencePiece: single bytes only
        pieces = [b"It", b"\xe2", b"\x80", b"\x99", b"s", b" ", b"\xe6", b"\x97", b"\xa5", b"\n", b"\xff", b""]
    text = TokenText(Pieces(pieces, fallback))
    shown = text.run(range(len(pieces)))
    assert "".join(t for t, _ in shown) == "It’s 日↵<0xFF>∅"
    assert "\ufffd" not in "".join(text(i) for i in range(len(pieces)))
    assert text(pieces.index(b"\xe6" if fallback else b" \xe6")) == ("<0xE6>" if fallback else " <0xE6>")
    continues = [pieces[i] for i, (t, more) in enumerate(shown) if more]
    assert continues == ([b"\x80", b"\x99", b"\x97", b"\xa5"] if fallback else [b"\x97", b"\xa5"])
    assert all(t == "" for t, more in shown if more)
    # a window that starts inside a character shows it on its first token; one that ends inside completes it
    start = pieces.index(b"\x97")
    assert text.run(range(start - 1, len(pieces)), before=1)[0] == ("日", False)
    assert text.run(range(start + 2), after=2)[-1] == ("日" if fallback else " 日", False)


def test_site_references_no_file_outside_its_folder(site: Path) -> None:
    class Links(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.found += [value for name, value in attrs if name in ("href", "src") and value]

    pages = list(site.rglob("*.html"))
    assert len(pages) == 1 + 1 + 1 + 9  # report, browsers' home, one index, 9 latent pages
    checked = 0
    for page in pages:
        parser = Links()
        parser.feed(page.read_text())
        for link in parser.found:
            if link.startswith("#"):
                continue
            assert ":" not in link.split("/")[0] and not link.startswith("/"), (page, link)  # no scheme, no root
            target = (page.parent / link.split("#")[0]).resolve()
            assert target.is_relative_to(site.resolve()) and target.is_file(), (page, link)
            checked += 1
    assert checked > 50
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000  # plotly.js itself, offline


def test_an_unchanged_matrix_recomputes_nothing(built: Built, site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr("saex.analysis.feature_data.encoded_pairs", refuse)
    monkeypatch.setattr("saex.run.sae_artifacts.train_sae", refuse)
    again = built.root / "again"
    assert cli(built, "browse", MATRIX, "--out", str(again), *SELECTION_ARGS) == 0
    (first,) = (site / "features").glob("*/latents.js")
    assert (again / "features" / first.parent.name / "latents.js").read_bytes() == first.read_bytes()


def test_browse_with_a_filter_matching_nothing_is_exit_2(built: Built, tmp_path: Path, capsys) -> None:
    assert cli(built, "browse", MATRIX, "--out", str(tmp_path), "--hook", "layers.0.resid_post") == 2
    assert "no original SAE scored on a compressed model matches" in capsys.readouterr().err


def test_a_scope_is_one_original_sae_on_one_compression(built: Built) -> None:
    rows = {r.key: r for r in ResultsStore.existing(built.store).rows(MATRIX)}
    runner = built.runner()
    assert scopes(runner, resolve_matrix(runner.registry, MATRIX), rows) == [
        Scope("site-m", HOOK, "site-small", "site-mag")
    ]


# --- in a real browser -------------------------------------------------------------------------------------


def chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "no headless browser: Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def open_page(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + 20
    while driver.execute_script("return document.readyState") != "complete" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # plotly draws after DOMContentLoaded
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def click(driver, element) -> None:
    """Click ``element`` scrolled to the middle of the window (the page's sticky header covers the top)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def column_texts(driver, table, column: int) -> list[str]:
    script = "return Array.from(arguments[0].tBodies[0].rows).map(r => r.cells[arguments[1]].textContent.trim())"
    return driver.execute_script(script, table, column)


def leading_number(text: str) -> float:
    return float(re.match(r"[+\-]?(\d+\.?\d*|\.\d+)(e[+\-]?\d+)?", text, re.I).group(0))


MIN_SVG_TEXT_PX = 9

LEGENDS = """
return Array.from(document.querySelectorAll("div.plot")).map((div) =>
  Array.from(div.querySelectorAll("g.legend g.traces")).map((entry) => {
    const shape = entry.querySelector("g.legendpoints path");
    return [entry.querySelector("text.legendtext").textContent, shape ? getComputedStyle(shape).fill : ""];
  }));
"""
# every drawn text of the figures' SVGs: its computed font size times the scale it is drawn at (plotly shrinks a
# bar's label with a transform, not its font size)
SVG_TEXT_SIZES = """
return Array.from(document.querySelectorAll("div.plot svg text")).flatMap((t) => {
  const box = t.getBoundingClientRect();
  if (!t.textContent.trim() || box.width === 0 || getComputedStyle(t).display === "none") return [];
  const m = t.getScreenCTM();
  const scale = m ? Math.hypot(m.a, m.b) : 1;
  return [[t.textContent, parseFloat(getComputedStyle(t).fontSize) * scale]];
});
"""
HEADERS = """
return Array.from(document.querySelectorAll("table.data th")).map((th) => [th.textContent.trim(), th.title]);
"""


def check_figures(driver, page: str) -> list[list[tuple[str, str]]]:
    """What can be checked of the plotly figures on the open page: each legend's entries differ in text and colour,
    and no text in their SVGs is drawn smaller than MIN_SVG_TEXT_PX. Returns the legends."""
    legends = driver.execute_script(LEGENDS)
    for entries in legends:
        texts, colours = [t for t, _ in entries], [c for _, c in entries]
        assert len(set(texts)) == len(texts) and len(set(colours)) == len(colours), (page, entries)
    sizes = driver.execute_script(SVG_TEXT_SIZES)
    assert sizes, page
    small = [(text, round(size, 1)) for text, size in sizes if size < MIN_SVG_TEXT_PX]
    assert not small, (page, small)
    return legends


def screenshot(driver, name: str, site: Path) -> Path:
    folder = Path(os.environ.get("SAEX_SCREENSHOTS") or site / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(folder / name))
    return folder / name


def test_site_in_headless_chromium(site: Path) -> None:
    from selenium.webdriver.common.by import By

    root = Path(os.environ.get("SAEX_SITE") or site)
    declared = tooltips(declared_outputs(load_plugins(entry_points=False)))
    driver = chrome()
    try:
        start = time.monotonic()
        open_page(driver, root / "index.html")
        assert driver.find_elements(By.CSS_SELECTOR, "div.plot .main-svg")  # plotly drew from the local copy
        screenshot(driver, "report.png", root)
        # the transfer gap (a light and a full bar per SAE) and the explorer (a colour per scored model)
        legends = check_figures(driver, "index.html")
        assert len(legends) >= 2 and all(len(entries) >= 2 for entries in legends)
        assert [text for text, _ in legends[0]][:2] == ["original on M", "original on M_c"]
        # every table header with a declaration says what its column holds, the summary's every header
        found = driver.execute_script(HEADERS)
        with_declaration = [(text, title) for text, title in found if text in declared]
        assert len(with_declaration) >= 20 and all(title for _, title in with_declaration), with_declaration
        assert all(title for text, title in driver.execute_script(HEADERS.replace("table.data", "table.summary")))
        driver.execute_script(  # the interactive figures under the page's sticky header
            "arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -50)",
            driver.find_element(By.CSS_SELECTOR, "h3[id$='-plots']"),
        )
        figures = Path(os.environ.get("SAEX_SCREENSHOTS") or root / "screenshots") / "figures.png"
        driver.save_screenshot(str(figures))
        # a table sorts by a numeric column both ways, and its filter keeps the matching rows
        table, column = next(
            (t, i)
            for t in driver.find_elements(By.CSS_SELECTOR, ".report table.data")
            if len(t.find_elements(By.CSS_SELECTOR, "tbody tr")) >= 3
            for i, th in enumerate(t.find_elements(By.CSS_SELECTOR, "thead th"))
            if "seconds to obtain" in th.text
        )
        head = table.find_elements(By.CSS_SELECTOR, "thead th")[column]
        click(driver, head)
        values = [leading_number(v) for v in column_texts(driver, table, column) if v]
        assert values == sorted(values) and head.get_attribute("aria-sort") == "ascending"
        click(driver, head)
        values = [leading_number(v) for v in column_texts(driver, table, column) if v]
        assert values == sorted(values, reverse=True)
        box = table.find_element(By.XPATH, "preceding-sibling::input[@type='search']")
        box.send_keys("retrained")
        shown = [r.text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if r.is_displayed()]
        assert shown and all("retrained" in text for text in shown)

        (home,) = root.glob("features/*/index.html")
        open_page(driver, home)
        rows = driver.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
        assert 0 < len(rows) <= 100  # one page of the index at a time
        density = next(th for th in driver.find_elements(By.CSS_SELECTOR, "#latents th") if th.text == "density on M")
        click(driver, density)
        index = driver.find_elements(By.CSS_SELECTOR, "#latents th").index(density)
        shown = [float(v) for v in column_texts(driver, driver.find_element(By.CSS_SELECTOR, "#latents table"), index)]
        assert shown == sorted(shown, reverse=True)
        search = driver.find_element(By.CSS_SELECTOR, "#latents input[type=search]")
        search.send_keys("intact")
        classes = column_texts(driver, driver.find_element(By.CSS_SELECTOR, "#latents table"), 1)
        assert classes and set(classes) == {"intact"}
        screenshot(driver, "features-index.png", root)

        # a latent with a page that fires on both models shows its contexts on both, side by side
        page = driver.find_element(By.CSS_SELECTOR, "#latents tbody a").get_attribute("href")
        open_page(driver, Path(page.removeprefix("file://")))
        for model in ("m", "mc"):
            assert driver.find_elements(By.CSS_SELECTOR, f".side[data-model={model}] ol.contexts li .tok.max")
        assert driver.find_elements(By.CSS_SELECTOR, "div.plot .main-svg")  # the histograms
        assert [text for text, _ in check_figures(driver, page)[0]] == ["on M", "on M_c"]
        ticks = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "div.plot .ytick text")]
        assert ticks and set(ticks) <= {"1", "10", "100", "1,000", "10,000", "100,000"}, ticks  # decades only
        screenshot(driver, "latent.png", root)
        print(f"browser test: {time.monotonic() - start:.1f} s in Chromium")
    finally:
        driver.quit()
