"""The feature browser: every latent of a matrix's original SAE at one (model, hook, SAE, compression), read on M
and on M_c over the same eval tokens (docs/REPORT.md).

Everything comes from the results store and the cache: the SAEs, eval activations and token blocks through the
runner's artifacts (found by content key, not recomputed), the survival values and classes the ``transfer``-style
metric stored with the original's cell on M_c (``saex.analysis.latent_store``; for rows written before,
computed from the activations with the same definitions, ``saex.analysis.survival``), the one-to-one partners of
the other SAEs stored with their cells (else the best cosine, ``saex.analysis.alignment``), and the per-latent
contexts of ``saex.analysis.feature_data``.

The site: ``features/index.html`` lists the browsers; each has an index of every latent (drawn from
``latents.js`` a page of rows at a time, sortable and searchable) and a page per selected latent: the most
damaged, the most intact and a seeded random sample of the latents firing on M (``Selection``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saex.analysis.alignment import best_cosines
from saex.analysis.feature_data import ContextPass, LatentPass, TokenWindows, context_pass, latent_pass
from saex.analysis.latent_store import KIND as PER_LATENT
from saex.analysis.latent_store import load_per_latent
from saex.analysis.survival import Survival, SurvivalParams, classify
from saex.config.matrix import BASE, Cell, Matrix, resolve_matrix
from saex.config.sources import parse_source
from saex.model.hookpoints import parse_hook
from saex.report.cells import sae_label, slug
from saex.report.plots import histogram
from saex.report.site import environment, script_json, write_assets
from saex.run.runner import Runner, Session
from saex.storage.cache import Cache, CacheError
from saex.storage.results import CellResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FOLDER = "features"
CLASSES = [member.name.lower() for member in Survival]  # class names by code
CONTEXTS = 10  # top contexts shown per model
BEFORE, AFTER = 12, 4  # tokens shown before and after a context's top token


@dataclass(frozen=True)
class Scope:
    """One feature browser: the original SAE ``sae`` at ``hook`` of ``model``, on M and on M_c of ``compression``."""

    model: str
    hook: str
    sae: str
    compression: str
    label: str = field(default="", compare=False)  # how the SAE is named (saex.report.cells.sae_label)

    @property
    def title(self) -> str:
        return f"{self.hook} · SAE {self.label or self.sae} · M vs M_c ({self.compression}) · {self.model}"

    @property
    def folder(self) -> str:
        return slug(f"{self.model}-{self.hook}-{self.sae}-{self.compression}")


@dataclass(frozen=True)
class Selection:
    """Which latents get a page: the ``damaged`` most damaged (dead on M_c first, by firing density on M, then
    the lowest activation correlation), the ``intact`` most intact (intact class, highest correlation) and
    ``random`` more drawn with ``seed``, among latents firing on M at least ``min_fires`` times."""

    damaged: int = 20
    intact: int = 20
    random: int = 20
    seed: int = 0
    min_fires: int = 5


class BrowseError(ValueError):
    """Nothing to browse for the matrix (and filters) asked for; the message says why."""


def scopes(runner: Runner, matrix: Matrix, results: dict[str, CellResult], **chosen: str | None) -> list[Scope]:
    """The scopes of ``matrix`` whose original SAE is scored on M_c (done), narrowed by ``chosen`` (model, hook,
    sae, compression: a value, or None for all)."""
    found = []
    for cell in matrix.cells:
        row = results.get(cell.key(runner.registry))
        if cell.scored_on == BASE or not parse_source(cell.source).is_original or row is None or row.status != "done":
            continue
        scope = Scope(cell.model, cell.hook, cell.sae, str(cell.compression), sae_label(row))
        if all(value is None or getattr(scope, name) == value for name, value in chosen.items()):
            found.append(scope)
    if not found:
        raise BrowseError(f"matrix {matrix!r}: no original SAE scored on a compressed model matches {chosen}")
    return list(dict.fromkeys(found))


def stored_per_latent(cache: Cache, row: CellResult | None) -> dict[str, torch.Tensor]:
    """The per-latent tensors a cell's metrics stored (``saex.analysis.latent_store``: survival values and classes,
    alignment partners); empty when the row has none (written before they were stored, or by metrics without them)."""
    if row is None or PER_LATENT not in row.details:
        return {}
    try:
        return load_per_latent(cache, row.details)
    except CacheError:
        return {}


def survival_params(runner: Runner, matrix: Matrix) -> SurvivalParams:
    """The survival thresholds of the matrix's metric that has them, else the defaults."""
    for metric in runner.registry.matrix_components(matrix.name, "metrics"):
        if isinstance(metric.params, SurvivalParams):
            return metric.params
    return SurvivalParams()


def select(latents: dict[str, torch.Tensor], classes: torch.Tensor, n_tokens: int, how: Selection) -> dict[int, str]:
    """Latent -> why it has a page ("damaged", "intact", "random"), in that order (``Selection``)."""
    density, corr, code = latents["density_m"].tolist(), latents["act_corr"].tolist(), classes.tolist()
    eligible = [j for j, share in enumerate(density) if round(share * n_tokens) >= how.min_fires]
    dead = sorted((j for j in eligible if code[j] == Survival.DEAD), key=lambda j: -density[j])
    by_corr = sorted(
        (j for j in eligible if code[j] != Survival.DEAD and not math.isnan(corr[j])), key=corr.__getitem__
    )
    damaged = dead + by_corr
    intact = [j for j in reversed(by_corr) if code[j] == Survival.INTACT]
    chosen: dict[int, str] = {}
    for reason, ranked, n in (("damaged", damaged, how.damaged), ("intact", intact, how.intact)):
        for j in [j for j in ranked if j not in chosen][:n]:
            chosen[j] = reason
    rest = [j for j in eligible if j not in chosen]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(how.seed)).tolist()
    for i in order[: how.random]:
        chosen[rest[i]] = "random"
    return chosen


@dataclass
class Match:
    """The best match of every original latent in another SAE: its latent (-1: not given) and cosine."""

    source: str
    how: str
    partner: torch.Tensor
    cosine: torch.Tensor


def matches(
    runner: Runner, session: Session, original: torch.Tensor, others: list[tuple[Cell, CellResult]]
) -> list[Match]:
    """Per other SAE scored on M_c: the one-to-one (Hungarian) partner of each original latent that the metric
    stored with its cell (``align_dec_partner``, inverted), else the best decoder cosine computed here."""
    found = []
    for cell, row in others:
        stored = stored_per_latent(runner.cache, row)
        if "align_dec_partner" in stored:
            theirs = stored["align_dec_partner"].long()
            kept = theirs >= 0
            partner = torch.full((len(original),), -1, dtype=torch.long)
            cosine = torch.full((len(original),), math.nan)
            partner[theirs[kept]] = kept.nonzero().flatten()
            cosine[theirs[kept]] = stored["align_dec_cos"].float()[kept]
            found.append(Match(cell.source, "one-to-one (Hungarian) partner", partner, cosine))
            continue
        target, hook = session.target(cell, runner.registry), parse_hook(cell.hook)
        other = runner.sae_artifact(cell, session.artifacts, target, hook).sae
        cosine = best_cosines(original, other.W_dec.detach()).cpu()
        found.append(Match(cell.source, "best decoder cosine", torch.full((len(original),), -1), cosine))
    return found


@dataclass
class Browser:
    """What one scope's pages show (module doc): ``values`` and ``classes`` per latent (stored with the cell,
    or computed when ``stored`` is False), the selected latents (``chosen``) and their contexts."""

    scope: Scope
    latents: LatentPass
    values: dict[str, torch.Tensor]
    classes: torch.Tensor
    stored: bool
    params: SurvivalParams
    chosen: dict[int, str]
    contexts: ContextPass
    matches: list[Match]
    windows: TokenWindows
    tokenizer: "PreTrainedTokenizerBase"


def gather(runner: Runner, session: Session, results: dict[str, CellResult], scope: Scope, how: Selection) -> Browser:
    """Read (or, for what is missing from the cache, compute once) everything ``scope``'s pages show."""
    registry, artifacts = runner.registry, session.artifacts
    cells = [
        c
        for c in session.matrix.cells
        if (c.model, c.hook, c.sae, c.compression) == (scope.model, scope.hook, scope.sae, scope.compression)
    ]
    rows = {c: results.get(c.key(registry)) for c in cells}
    reference = next(c for c in cells if c.scored_on != BASE and parse_source(c.source).is_original)
    hook, target = parse_hook(scope.hook), session.target(reference, registry)
    sae = runner.sae_artifact(reference, artifacts, target, hook)
    on_m, on_mc = artifacts.activations(artifacts.base, "eval", hook), artifacts.activations(target, "eval", hook)
    params, device = survival_params(runner, session.matrix), artifacts.setting.device
    latents = latent_pass(runner.cache, sae.sae, sae.key, on_m, on_mc, params.top_k, device)
    stored = stored_per_latent(runner.cache, rows[reference])
    has_classes = "survival_class" in stored
    values = stored if has_classes else latents.tensors
    classes = stored["survival_class"] if has_classes else classify(latents.tensors, params)
    chosen = select(values, classes.long(), latents.n_tokens, how)
    tokenizer = artifacts.setting.loaded.tokenizer
    windows = TokenWindows(artifacts.setting.blocks.eval, tokenizer, BEFORE, AFTER)
    window_rows = windows.rows(
        r for j in chosen for _, r in top_contexts(latents, j, "m") + top_contexts(latents, j, "mc")
    )
    unembedding = artifacts.setting.loaded.model.get_output_embeddings().weight.detach()
    selected = torch.tensor(list(chosen), dtype=torch.long)
    contexts = context_pass(runner.cache, sae.sae, latents, on_m, on_mc, selected, window_rows, unembedding, device)
    others = [
        (c, row)
        for c, row in rows.items()
        if c.scored_on != BASE and c is not reference and row is not None and row.status == "done"
    ]
    found = matches(runner, session, sae.sae.W_dec.detach(), others)
    return Browser(
        scope, latents, values, classes.long(), has_classes, params, chosen, contexts, found, windows, tokenizer
    )


def top_contexts(latents: LatentPass, latent: int, model: str) -> list[tuple[float, int]]:
    """(activation, row) of latent's ``CONTEXTS`` largest activations on ``model`` ("m" or "mc"), largest first."""
    values = latents.tensors[f"top_{model}_values"][:CONTEXTS, latent].tolist()
    rows = latents.tensors[f"top_{model}_positions"][:CONTEXTS, latent].tolist()
    return [(v, r) for v, r in zip(values, rows) if v > 0]


# --- pages ---------------------------------------------------------------------------------------------------


def _number(value: float) -> float | None:
    """A JSON-able number rounded to 4 significant digits; None for NaN and infinities."""
    return float(f"{value:.4g}") if math.isfinite(value) else None


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) printable stand-in character of each byte -> the byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(c): b for c, b in zip([*kept, *(256 + n for n in range(len(moved)))], [*kept, *moved])}


BYTE_LEVEL = _byte_level_alphabet()


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence ``lead`` starts (0: not a lead byte)."""
    for length, (low, high) in enumerate(((0x00, 0x7F), (0xC2, 0xDF), (0xE0, 0xEF), (0xF0, 0xF4)), start=1):
        if low <= lead <= high:
            return length
    return 0


def _visible(text: str) -> str:
    return text.replace("\n", "↵").replace("\t", "⇥")


class TokenText:
    """Display text of token ids, made once each. A token is shown as its bytes read as UTF-8, line breaks and tabs
    made visible; bytes that are no whole character (a byte token, a piece of a character split across tokens) as
    ``<0xE2>``, never as "�". In a run of tokens (``run``) a character split across tokens is shown whole on the
    token where it starts."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase"):
        self.tokenizer = tokenizer
        self.known: dict[int, str] = {}
        self.raw: dict[int, bytes | None] = {}

    def bytes_of(self, token: int) -> bytes | None:
        """The token's bytes: its decoded text's where that is whole UTF-8, else read from its vocabulary entry
        (``<0xE2>`` byte-fallback tokens, byte-level BPE's alphabet); None where neither tells."""
        if token not in self.raw:
            text = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
            found: bytes | None = text.encode()
            if "\ufffd" in text:
                piece = self.tokenizer.convert_ids_to_tokens(token)
                match = BYTE_TOKEN.fullmatch(piece) if isinstance(piece, str) else None
                if match:
                    found = bytes([int(match[1], 16)])
                elif isinstance(piece, str) and piece and all(c in BYTE_LEVEL for c in piece):
                    found = bytes(BYTE_LEVEL[c] for c in piece)
                else:
                    found = None
            self.raw[token] = found
        return self.raw[token]

    def __call__(self, token: int) -> str:
        if token not in self.known:
            ((text, _),) = self.run([token])
            self.known[token] = text
        return self.known[token]

    def run(self, tokens: Sequence[int], before: int = 0, after: int = 0) -> list[tuple[str, bool]]:
        """(text, continues) of each token of ``tokens`` but the ``before`` first and ``after`` last, which are read
        only to complete characters split across the edges (a character begun before the first token shown is shown
        on it): ``continues`` where all of a token's bytes belong to a character shown on an earlier token (its text
        is then empty)."""
        texts = [""] * len(tokens)
        owners: list[int] = []  # the token of each byte in ``buffer``
        buffer = bytearray()

        def flush() -> None:
            at = 0
            while at < len(buffer):
                length = _utf8_length(buffer[at])
                try:
                    char = bytes(buffer[at : at + length]).decode() if length and at + length <= len(buffer) else None
                except UnicodeDecodeError:
                    char = None
                if char is None:
                    texts[owners[at]] += f"<0x{buffer[at]:02X}>"
                    at += 1
                    continue
                owner = owners[at] if owners[at] >= before else min(before, owners[at + length - 1])
                texts[owner] += char
                at += length
            buffer.clear()
            owners.clear()

        for i, token in enumerate(tokens):
            data = self.bytes_of(token)
            if data is None:  # its decoded text as it is, between the characters before and after it
                flush()
                texts[i] = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
                continue
            buffer += data
            owners += [i] * len(data)
        flush()
        shown = range(before, len(tokens) - after)
        return [
            (_visible(texts[i]) or "∅", False) if texts[i] or not self.bytes_of(tokens[i]) else ("", True)
            for i in shown
        ]


MODELS = {"m": "M", "mc": "M_c"}


def _context(b: Browser, text: TokenText, latent: int, column: int, model: str, value: float, row: int) -> dict:
    """One context: the window's tokens shaded by the latent's activation on ``model``, with both activations."""
    other = "mc" if model == "m" else "m"
    t = b.contexts.tensors

    def on(which: str, token_row: int) -> float:
        return float(t[f"window_{which}"][int(torch.searchsorted(t["rows"], token_row)), column])

    tokens = []
    window = b.windows.window(row)
    block = window.start - window.start % b.windows.block_size
    around = range(max(block, window.start - 3), min(block + b.windows.block_size, window.stop + 3))
    ids = [int(b.windows.ids[flat]) for flat in around]
    shown = text.run(ids, window.start - around.start, around.stop - window.stop)
    for flat, (piece_text, continues) in zip(window, shown):
        token_row = int(b.windows.row_of[flat])
        piece = {"text": piece_text, "alpha": 0.0, "title": "special token", "max": False, "continues": continues}
        if token_row >= 0:
            mine, theirs = on(model, token_row), on(other, token_row)
            piece |= {
                "alpha": round(max(0.0, mine) / float(t["hist_max"][column]), 3),
                "title": f"{MODELS[model]}: {mine:.3g} · {MODELS[other]}: {theirs:.3g}"
                + (" · the rest of the character before" if continues else ""),
                "max": token_row == row,
            }
        tokens.append(piece)
    block, offset = divmod(int(b.windows.positions[row]), b.windows.block_size)
    meta = (
        f"{MODELS[model]} {value:.3g} · {MODELS[other]} {on(other, row):.3g} at the outlined token · "
        f"block {block}, token {offset}"
    )
    return {"meta": meta, "tokens": tokens}


def latent_page(b: Browser, text: TokenText, latent: int) -> dict:
    """The template values of one latent's page."""
    t, v, top = b.contexts.tensors, b.values, b.latents.tensors
    column = int((t["latents"] == latent).nonzero()[0, 0])
    n = b.latents.n_tokens
    edges = torch.linspace(0, float(t["hist_max"][column]), len(t["hist_m"][column])).tolist()
    counts = {"on M": t["hist_m"][column, 1:].tolist(), "on M_c": t["hist_mc"][column, 1:].tolist()}
    logits = {
        kind: [(text(int(i)), f"{float(x):+.3f}") for i, x in zip(t[kind][column], t[f"{kind}_logit"][column])]
        for kind in ("promoted", "suppressed")
    }

    def density(key: str) -> str:
        share = float(v[key][latent])
        return f"{share:.4g} ({round(share * n)} of {n} tokens)"

    stats = [
        ("survival class", CLASSES[int(b.classes[latent])]),
        ("firing density on M", density("density_m")),
        ("firing density on M_c", density("density_mc")),
        ("frequency ratio M_c / M", f"{float(v['freq_ratio'][latent]):.4g}"),
        ("activation correlation M vs M_c", f"{float(v['act_corr'][latent]):.4g}"),
        (f"top-{b.params.top_k} position overlap", f"{float(v['top_overlap'][latent]):.4g}"),
        (
            "largest activation on M / on M_c",
            f"{float(top['top_m_values'][0, latent]):.4g} / {float(top['top_mc_values'][0, latent]):.4g}",
        ),
    ]
    best = [
        (m.source, int(m.partner[latent]) if m.partner[latent] >= 0 else "", f"{float(m.cosine[latent]):.3f}", m.how)
        for m in b.matches
    ]
    contexts = {
        model: [
            _context(b, text, latent, column, model, value, row)
            for value, row in top_contexts(b.latents, latent, model)
        ]
        for model in MODELS
    }
    return {
        "latent": latent,
        "reason": b.chosen[latent],
        "class": CLASSES[int(b.classes[latent])],
        "stats": stats,
        "contexts": contexts,
        "histogram": histogram(edges, counts),
        "zeros": (int(t["hist_m"][column, 0]), int(t["hist_mc"][column, 0])),
        "logits": logits,
        "matches": best,
        "n_tokens": n,
    }


def index_data(b: Browser, text: TokenText, pages: dict[int, str]) -> dict:
    """``latents.js``'s data: one row per latent (compact arrays), the columns, and the pages of the selected."""
    v, top = b.values, b.latents.tensors
    columns = [
        {"key": "id", "label": "latent", "type": "num"},
        {"key": "class", "label": "class", "title": "survival class on M_c"},
        {"key": "page", "label": "page", "title": "why the latent has a page"},
        {"key": "density_m", "label": "density on M", "type": "num", "title": "share of eval tokens it fires on, on M"},
        {"key": "density_mc", "label": "density on M_c", "type": "num", "title": "share of the same tokens, on M_c"},
        {"key": "freq_ratio", "label": "freq. ratio", "type": "num", "title": "density on M_c / density on M"},
        {"key": "act_corr", "label": "act. corr. ↑", "type": "num", "title": "activation correlation M vs M_c"},
        {
            "key": "top_overlap",
            "label": f"top-{b.params.top_k} overlap ↑",
            "type": "num",
            "title": "shared top positions",
        },
        {"key": "max_m", "label": "max on M", "type": "num"},
        {"key": "max_mc", "label": "max on M_c", "type": "num"},
        *(
            {"key": f"match{i}", "label": f"cos {m.source}", "type": "num", "title": m.how}
            for i, m in enumerate(b.matches)
        ),
        {"key": "token", "label": "top token on M", "title": "the token of its largest activation on M"},
    ]
    numbers = [v[k].tolist() for k in ("density_m", "density_mc", "freq_ratio", "act_corr", "top_overlap")]
    numbers += [top["top_m_values"][0].tolist(), top["top_mc_values"][0].tolist()]
    numbers += [m.cosine.tolist() for m in b.matches]
    top_rows = top["top_m_positions"][0].tolist()
    rows = []
    for j in range(b.latents.d_sae):
        token = text(int(b.windows.ids[b.windows.positions[top_rows[j]]])) if top_rows[j] >= 0 else ""
        rows.append([j, CLASSES[int(b.classes[j])], b.chosen.get(j, ""), *(_number(x[j]) for x in numbers), token])
    return {"columns": columns, "rows": rows, "pages": {j: pages[j] for j in pages}}


def write_scope(out_dir: Path, b: Browser, report: bool) -> list[Path]:
    """One scope's index, ``latents.js`` and latent pages under ``out_dir/features/<scope>/``."""
    folder = Path(out_dir) / FOLDER / b.scope.folder
    folder.mkdir(parents=True, exist_ok=True)
    env, text = environment(), TokenText(b.tokenizer)
    order = list(b.chosen)
    pages = {j: f"latent-{j}.html" for j in order}
    common = {"root": "../../", "scope": b.scope, "report": report, "json": script_json}
    written = []
    data = index_data(b, text, pages)
    (folder / "latents.js").write_text("window.SAEX_LATENTS = " + script_json(data) + ";\n")
    counts = {name: int((b.classes == code).sum()) for code, name in enumerate(CLASSES)}
    index = env.get_template("features.html.j2").render(
        **common,
        counts=counts,
        d_sae=b.latents.d_sae,
        n_tokens=b.latents.n_tokens,
        stored=b.stored,
        params=b.params,
        chosen=[(j, b.chosen[j], CLASSES[int(b.classes[j])]) for j in order],
        pages=pages,
    )
    (folder / "index.html").write_text(index)
    written += [folder / "latents.js", folder / "index.html"]
    template = env.get_template("latent.html.j2")
    for i, j in enumerate(order):
        neighbours = {
            "prev": pages[order[i - 1]] if i else None,
            "next": pages[order[i + 1]] if i + 1 < len(order) else None,
        }
        html = template.render(**common, page=latent_page(b, text, j), **neighbours)
        (folder / pages[j]).write_text(html)
        written.append(folder / pages[j])
    return written


def browse(
    runner: Runner,
    name: str,
    results: Iterable[CellResult],
    out_dir: Path,
    device: torch.device,
    how: Selection = Selection(),
    *,
    link_report: bool = False,
    **chosen: str | None,
) -> list[Path]:
    """Write the feature browser of every chosen scope of matrix ``name`` (``chosen``: model, hook, sae, compression;
    None for all) under ``out_dir/features``, with the site's assets (its pages link the report's index.html when
    ``link_report``); return the paths written."""
    rows = {r.key: r for r in results}
    matrix = resolve_matrix(runner.registry, name)
    found = scopes(runner, matrix, rows, **chosen)
    out_dir = Path(out_dir)
    written = write_assets(out_dir)
    sessions: dict[str, Session] = {}
    for scope in found:
        if scope.model not in sessions:
            sessions[scope.model] = runner.open_model(matrix, scope.model, device)
        written += write_scope(out_dir, gather(runner, sessions[scope.model], rows, scope, how), link_report)
    home = (
        environment()
        .get_template("features_home.html.j2")
        .render(root="../", scopes=found, matrix=matrix, report=link_report)
    )
    (out_dir / FOLDER / "index.html").write_text(home)
    return [*written, out_dir / FOLDER / "index.html"]
