"""Build the HTML template that makes `dvc plots show` render offline: vega, vega-lite and vega-embed inlined.

    python infra/dvc_plots/build_template.py .venv/share/scratchlm/dvc_plots.html    # what `make install` runs

DVC's own page loads the three libraries from a CDN (dvc_render.vega.VegaRenderer.SCRIPTS), so it is blank
without the network. `.dvc/config` names this template instead (`plots.html_template`, relative to .dvc/). It
has DVC's `{plot_divs}` placeholder and no `{scripts}` one, so DVC never adds the CDN tags.

The libraries come from the npm registry at install time, never at run time: `npm pack` of the pinned versions
below (the major versions DVC's templates are written for), each tarball checked against its pinned sha512
before its `build/*.min.js` is read. No npm on the machine, or no registry, writes DVC's own (online) page
instead and says so: `dvc plots show` works, with the network. A checksum that does not match stops with an error.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {  # name: (version, npm's `integrity` of the tarball, the UMD bundle inside it)
    "vega": (
        "5.33.1",
        "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
        "package/build/vega.min.js",
    ),
    "vega-lite": (
        "5.23.0",
        "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
        "package/build/vega-lite.min.js",
    ),
    "vega-embed": (
        "6.29.0",
        "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
        "package/build/vega-embed.min.js",
    ),
}
OFFLINE_MARK = "<!-- scratchlm: vega, vega-lite and vega-embed inlined (offline) -->"
"""The template's first line when the libraries are inlined (tests/test_plots_offline.py looks for it)."""

PAGE = """<!DOCTYPE html>
{mark}
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>scratchlm: DVC plots</title>
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class ChecksumMismatch(RuntimeError):
    """A tarball from the registry is not the one pinned here."""


def sri(data: bytes) -> str:
    """npm's `integrity` string (Subresource Integrity, sha512) of `data`."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch_bundles(workdir: Path) -> dict[str, str]:
    """{name: the minified JS} of every package, from `npm pack` tarballs checked against their pinned sha512.

    Raises FileNotFoundError (no npm), subprocess.CalledProcessError (npm failed: no registry), ChecksumMismatch."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not installed")
    specs = [f"{name}@{version}" for name, (version, _, _) in PACKAGES.items()]
    subprocess.run(
        [npm, "pack", *specs, "--pack-destination", str(workdir), "--loglevel=error"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    bundles = {}
    for name, (version, integrity, member) in PACKAGES.items():
        tarball = workdir / f"{name}-{version}.tgz"
        got = sri(tarball.read_bytes())
        if got != integrity:
            raise ChecksumMismatch(f"{name}@{version}: the registry's tarball is {got}, pinned {integrity}")
        with tarfile.open(tarball) as tar:
            file = tar.extractfile(member)
            if file is None:
                raise ChecksumMismatch(f"{name}@{version}: no {member} in the tarball")
            bundles[name] = file.read().decode("utf-8")
    return bundles


def inline(js: str) -> str:
    """A script element holding `js`; a `</script` inside it would end the element early, so it is escaped."""
    return "    <script>\n" + js.replace("</script", "<\\/script") + "\n    </script>"


def offline_page(bundles: dict[str, str]) -> str:
    page = PAGE.format(mark=OFFLINE_MARK, scripts="\n".join(inline(bundles[name]) for name in PACKAGES))
    for placeholder in ("{scripts}", "{plot_divs}", "{refresh_tag}"):  # DVC fills these by plain replacement
        expected = 0 if placeholder == "{scripts}" else 1
        if page.count(placeholder) != expected:
            raise ValueError(f"the libraries contain DVC's placeholder {placeholder}; the template would break")
    return page


def online_page() -> str:
    """DVC's own page layout: DVC puts its CDN script tags at `{scripts}`."""
    return PAGE.format(mark="<!-- scratchlm: online (vega from DVC's CDN links) -->", scripts="    {scripts}")


def why(error: BaseException) -> str:
    """A few words for why `npm pack` gave nothing: npm's last error line, or what happened."""
    if isinstance(error, subprocess.CalledProcessError):
        lines = (error.stderr or b"").decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"npm pack exited {error.returncode}"
    if isinstance(error, subprocess.TimeoutExpired):
        return f"npm pack took over {error.timeout:g} s"
    return str(error)


def build(out: Path) -> bool:
    """Write the template to `out`; True when the libraries are inlined, False for the online fallback."""
    with tempfile.TemporaryDirectory(prefix="dvc-plots-") as workdir:
        try:
            page, offline = offline_page(fetch_bundles(Path(workdir))), True
        except (FileNotFoundError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            print(
                f"warning: {out}: vega could not be fetched ({why(e)}); `dvc plots show` will load it from the "
                f"network. Install npm and rerun `make plots-template` for an offline page.",
                file=sys.stderr,
            )
            page, offline = online_page(), False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return offline


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python infra/dvc_plots/build_template.py OUT.html", file=sys.stderr)
        return 2
    out = Path(argv[0])
    try:
        offline = build(out)
    except ChecksumMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    versions = ", ".join(f"{name} {version}" for name, (version, _, _) in PACKAGES.items())
    what = f"offline, {versions} inlined" if offline else "online (CDN)"
    print(f"{out}: {what}; {out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
