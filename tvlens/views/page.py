"""Self-contained HTML: view fragments, one page with each JavaScript library inlined once.

Nothing here loads anything from the network. plotly.js comes from the installed ``plotly`` package
(``plotly.offline.get_plotlyjs()``), CircuitsVis from the bundle shipped inside the installed
``circuitsvis`` package (``circuitsvis/dist/cdn/iife.js``). CircuitsVis' own ``render()`` is not used:
its ``str()`` imports the bundle from unpkg and its ``_repr_html_`` probes the internet first.

- a :class:`Fragment` is one view: HTML (a ``<div>`` and the ``<script>`` that draws into it) plus
  the names of the libraries it needs;
- a :class:`Page` collects fragments and writes one document whose ``<head>`` inlines each needed
  library exactly once, however many views use it (``Page.save`` writes atomically);
- in Jupyter, :func:`notebook_html` prepends each library the first time this kernel shows a view
  that needs it (guarded, so running it twice is harmless); later outputs reuse it.

Data reaches scripts only as JSON with ``<``, ``>``, ``&`` and line separators escaped
(:func:`script_json`), so a token such as ``</script><script>alert(1)</script>`` stays text.
"""

from __future__ import annotations

import html as _html
import json
import math
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Iterable

from tvlens.errors import ConfigError

LIBRARIES = ("plotly", "circuitsvis")


# --------------------------------------------------------------------------- libraries
@cache
def plotly_js() -> str:
    """plotly.js from the installed plotly package (no CDN)."""
    from plotly.offline import get_plotlyjs

    return _safe_inline(get_plotlyjs())


@cache
def circuitsvis_js() -> str:
    """The CircuitsVis browser bundle shipped inside the installed ``circuitsvis`` package."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise ConfigError(f"the circuitsvis package has no bundled JavaScript at {path}; reinstall circuitsvis")
    return _safe_inline(path.read_text(encoding="utf-8"))


def _safe_inline(js: str) -> str:
    """JavaScript that can sit inside ``<script>``: ``</script`` only occurs in string literals of
    these bundles, where ``<\\/script`` means the same; the source-map comment would point nowhere."""
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    js = re.sub(r"^//# sourceMappingURL=.*$", "", js, flags=re.MULTILINE)
    return js.replace("<!--", "<\\!--")


def library_script(name: str) -> str:
    """One ``<script>`` defining ``window.Plotly`` or ``window.CircuitsVis`` unless it already exists."""
    if name == "plotly":
        # plotly.js assigns window.Plotly itself
        body = f"if (!window.Plotly) (function(){{\n{plotly_js()}\n}})();"
    elif name == "circuitsvis":
        # the bundle declares `var CircuitsVis`; inside the function that is local, so publish it
        body = f"if (!window.CircuitsVis) (function(){{\n{circuitsvis_js()}\nwindow.CircuitsVis = CircuitsVis;\n}})();"
    else:
        raise ConfigError(f"unknown library {name!r}; known: {list(LIBRARIES)}")
    return f'<script data-tvlens-lib="{name}">\n{body}\n</script>'


# --------------------------------------------------------------------------- data into scripts
def _clean(obj: Any) -> Any:
    """Tensors/arrays to lists, NaN and infinities to null (JSON has neither)."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def script_json(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element, whatever strings it holds."""
    s = json.dumps(_clean(obj), allow_nan=False, separators=(",", ":"))
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def new_id(prefix: str = "tvl") -> str:
    """A fresh element id that is also a valid CSS selector (CircuitsVis looks it up with ``#id``)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def esc(text: Any) -> str:
    return _html.escape(str(text), quote=True)


# --------------------------------------------------------------------------- fragments
@dataclass
class Fragment:
    """One view: its HTML (elements and the inline script drawing them) and the libraries it needs."""

    html: str
    libs: frozenset[str] = frozenset()
    title: str = ""
    kind: str = ""

    def _repr_html_(self) -> str:
        return notebook_html(self)

    def __repr__(self) -> str:
        return f"Fragment(kind={self.kind!r}, title={self.title!r}, libs={sorted(self.libs)}, {len(self.html)} chars)"

    def save(self, path: str | Path, title: str | None = None, overwrite: bool = False) -> Path:
        """This view alone as a self-contained HTML page, written atomically; an existing file is refused
        unless ``overwrite=True`` (``.html`` is added to a name without a suffix)."""
        page = Page(title or self.title or "tvlens view")
        page.add(self)
        return page.save(path, overwrite=overwrite)


def html_fragment(body: str, title: str = "", kind: str = "html") -> Fragment:
    """Static HTML (already escaped by the caller)."""
    return Fragment(html=body, libs=frozenset(), title=title, kind=kind)


def figure_fragment(fig, title: str = "", height: int | None = None) -> Fragment:
    """A plotly figure drawn by the page's single copy of plotly.js."""
    if not hasattr(fig, "to_plotly_json"):
        raise ConfigError(f"figure_fragment needs a plotly Figure, got {type(fig).__name__}")
    div = new_id("tvl-plot")
    data, layout = plotly_payload(fig)
    if height is not None:
        layout["height"] = height
    js = (f"Plotly.newPlot({script_json(div)}, {data}, {script_json(layout)}, "
          f"{script_json({'responsive': True, 'displaylogo': False})});")
    body = (f'<div class="tvlens-view tvlens-plot" data-view="plot">'
            f'<div id="{div}" class="plotly-graph-div tvlens-plotly"></div>'
            f"<script>{js}</script></div>")
    return Fragment(html=body, libs=frozenset({"plotly"}), title=title or _figure_title(fig), kind="plot")


def plotly_payload(fig) -> tuple[str, dict]:
    """The figure's traces as script-safe JSON (plotly's encoder: numpy arrays, dates) and its layout."""
    import plotly.io as pio

    full = json.loads(pio.to_json(fig, validate=False, engine="json"))
    data = script_json(full.get("data", []))
    return data, full.get("layout", {})


def _figure_title(fig) -> str:
    t = fig.layout.title.text if fig.layout.title is not None else None
    return re.sub(r"<[^>]*>", "", t) if t else ""


def as_fragment(view: Any, title: str = "") -> Fragment:
    """A Fragment from a Fragment, a plotly figure, or a result object with ``.plot()``."""
    if isinstance(view, Fragment):
        return view
    if hasattr(view, "to_plotly_json"):
        return figure_fragment(view, title=title)
    if hasattr(view, "plot"):
        return as_fragment(view.plot(), title=title)
    raise ConfigError(f"cannot make a view from {type(view).__name__}: give a Fragment, a plotly Figure or a result")


# --------------------------------------------------------------------------- notebooks
_NOTEBOOK_LIBS: set[str] = set()


def notebook_html(fragment: Fragment, force_libs: bool = False) -> str:
    """HTML for a Jupyter output: the libraries this kernel has not sent yet, then the view."""
    libs = [name for name in LIBRARIES if name in fragment.libs and (force_libs or name not in _NOTEBOOK_LIBS)]
    _NOTEBOOK_LIBS.update(libs)
    return "".join(library_script(n) for n in libs) + fragment.html


def reset_notebook_libraries() -> None:
    """Send the libraries again with the next view (e.g. after clearing the output that held them)."""
    _NOTEBOOK_LIBS.clear()


def result_html(summary_html: str, views: Iterable[Fragment]) -> str:
    """A result's ``_repr_html_``: its summary table followed by its views."""
    frags = list(views)
    merged = Fragment(html=summary_html + "".join(f.html for f in frags),
                      libs=frozenset().union(*[f.libs for f in frags]) if frags else frozenset())
    return notebook_html(merged)


# --------------------------------------------------------------------------- pages
PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1f2933; padding: 0 16px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d9e2ec; }
.tvlens-note { color: #52606d; font-size: 0.92em; max-width: 900px; }
.tvlens-summary { background: #f5f7fa; padding: 12px 16px; border-radius: 6px; white-space: pre-wrap;
                  font-family: ui-monospace, monospace; font-size: 0.9em; }
table.tvlens-table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
table.tvlens-table td, table.tvlens-table th { border: 1px solid #d9e2ec; padding: 3px 8px; text-align: right; }
table.tvlens-summary-table th, table.tvlens-summary-table td { text-align: left; }
table.tvlens-summary-table { background: #f5f7fa; }
.tvlens-section { margin-bottom: 28px; }
.tvlens-heads button { margin: 2px; font-family: ui-monospace, monospace; cursor: pointer; }
.tvlens-heads button.tvlens-active { background: #2680c2; color: white; }
"""


@dataclass
class Section:
    heading: str
    fragment: Fragment
    note: str = ""


@dataclass
class Page:
    """A self-contained HTML document: sections of views; each library inlined once in ``<head>``."""

    title: str = "tvlens"
    intro_html: str = ""
    sections: list[Section] = field(default_factory=list)

    def add(self, view: Any, heading: str = "", note: str = "") -> Fragment:
        frag = as_fragment(view)
        self.sections.append(Section(heading or frag.title, frag, note))
        return frag

    @property
    def libs(self) -> list[str]:
        used = set().union(*[s.fragment.libs for s in self.sections]) if self.sections else set()
        return [n for n in LIBRARIES if n in used]

    def to_html(self) -> str:
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                 '<meta name="viewport" content="width=device-width, initial-scale=1">',
                 # nothing on this page may load from elsewhere: the libraries and data are inline
                 "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
                 "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; "
                 "font-src data:; connect-src 'none'\">",
                 f"<title>{esc(self.title)}</title>", f"<style>{PAGE_CSS}</style>"]
        parts += [library_script(n) for n in self.libs]
        parts.append("</head><body>")
        parts.append(f"<h1>{esc(self.title)}</h1>{self.intro_html}")
        for s in self.sections:
            parts.append(f'<section class="tvlens-section" data-kind="{esc(s.fragment.kind)}">')
            if s.heading:
                parts.append(f"<h2>{esc(s.heading)}</h2>")
            if s.note:
                parts.append(f'<p class="tvlens-note">{esc(s.note)}</p>')
            parts.append(s.fragment.html)
            parts.append("</section>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the page atomically (a temporary file in the same folder, then a rename). An existing file
        is refused unless ``overwrite=True``; a folder, an empty name or a symlink loop are refused."""
        from tvlens.checks import check_new_file

        path = check_new_file(path, "path", overwrite=overwrite, where="save", suffix=".html")
        return atomic_write_text(path, self.to_html())

    def _repr_html_(self) -> str:
        merged = Fragment(html="".join(f"<h3>{esc(s.heading)}</h3>" + s.fragment.html for s in self.sections),
                          libs=frozenset(self.libs))
        return notebook_html(merged)


def check_writable_dir(folder: str | Path, argument: str = "out") -> Path:
    """Create ``folder`` if needed and prove a file can be written there; a clear error if not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tvlens-probe-", delete=True):
            pass
    except OSError as e:
        raise ConfigError(f"{argument}={str(folder)!r}: the report folder cannot be written ({e.strerror or e})") from e
    return folder


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``: never a half-written file."""
    from tvlens.checks import atomic_write

    path = Path(path)
    check_writable_dir(path.parent, "path")
    return atomic_write(path, text)
