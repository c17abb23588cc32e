"""What `pip install veil` puts on a researcher's machine: distributions and megabytes, in a fresh venv.

Builds a wheel from the checkout, installs it into a new virtual environment with pip (dependencies
from the package index), then counts the installed distributions and the size of site-packages, and
checks that none of the hospital's heavy stack came along. The baseline, installed the same way into a
second fresh venv, is what any Jupyter client of OpenDP needs anyway: ipykernel, Polars, httpx,
pydantic, sqlglot and OpenDP's Polars extra.

    python bench/researcher_install.py              # veil and the baseline (~3-5 min)
    python bench/researcher_install.py --no-baseline --json   # veil only, one JSON line (the test uses it)

Targets (issue 13): at most 60 distributions and 600 MB, and none of HEAVY. The megabytes are missed:
OpenDP's native library alone is 263 MB, and the Arrow it needs to hand frames across its FFI 170 MB
(README, "Installs"); CEILING_MB guards against growth beyond today's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "jax", "jaxlib", "fastapi", "uvicorn", "sqlalchemy", "opacus", "flwr", "mbi", "starlette")
BASELINE = ["ipykernel", "polars==1.36.1", "httpx", "pydantic", "sqlglot", "opendp[polars]==0.16.0"]
MAX_DISTRIBUTIONS, MAX_MB = 60, 600
CEILING_MB = 850
"""What the test holds the install to: OpenDP in the researcher's process (exact mock pricing) costs ~750 MB."""
TOOLS = ("pip", "setuptools", "wheel")


def build_wheel(out: Path) -> Path:
    """The checkout's wheel (no dependencies; the build tools of the current environment)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True)
    return next(out.glob("veil-*.whl"))


def clean_environment() -> dict[str, str]:
    """This process's environment without what would point a fresh venv at other packages (Flower's Ray
    backend, for one, sets PYTHONPATH to its caller's sys.path)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def install(requirements: list[str], where: Path) -> dict[str, object]:
    """Install into a fresh venv; its distributions and size (pip, setuptools and wheel excepted)."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    env = clean_environment()
    started = time.monotonic()
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
                   check=True, env=env)
    seconds = time.monotonic() - started
    listed = json.loads(subprocess.run([str(python), "-m", "pip", "list", "--format", "json",
                                        "--disable-pip-version-check"], check=True, capture_output=True,
                                       text=True, env=env).stdout)
    names = sorted(d["name"].lower() for d in listed if d["name"].lower() not in TOOLS)
    site = next((where / "lib").glob("python3*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*")
               if f.is_file() and not f.is_symlink() and f.relative_to(site).parts[0].split("-")[0] not in TOOLS)
    return {"distributions": len(names), "megabytes": round(size / 2**20, 1), "names": names,
            "heavy": sorted(set(names) & set(HEAVY)), "install_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline install")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="veil-install-") as tmp:
        wheel = build_wheel(Path(tmp) / "wheel")
        veil = install([str(wheel)], Path(tmp) / "veil")
        check = subprocess.run([str(Path(tmp) / "veil" / "bin" / "python"), "-c",
                                "import veil.kernel, veil.kernel.magics, veil.kernel.mock, veil.query.prepared"],
                               capture_output=True, text=True, cwd=tmp, env=clean_environment())  # not the checkout's veil/
        veil["imports"] = check.returncode == 0 and "ok" or check.stderr.strip().splitlines()[-1]
        baseline = None if args.no_baseline else install(BASELINE, Path(tmp) / "baseline")
    result = {"veil": veil, "baseline": baseline,
              "targets": {"distributions": MAX_DISTRIBUTIONS, "megabytes": MAX_MB, "ceiling_megabytes": CEILING_MB,
                          "heavy": []}}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'install':<28}{'distributions':>14}{'MB':>10}{'seconds':>10}")
    for name, row in (("pip install veil", veil), ("baseline (" + ", ".join(BASELINE) + ")", baseline)):
        if row is not None:
            print(f"{name[:27]:<28}{row['distributions']:>14}{row['megabytes']:>10}{row['install_seconds']:>10}")
    if baseline is not None:
        print(f"ratio veil/baseline: {veil['distributions'] / baseline['distributions']:.2f}x distributions, "  # type: ignore[operator]
              f"{veil['megabytes'] / baseline['megabytes']:.2f}x MB")  # type: ignore[operator]
    print(f"targets: <= {MAX_DISTRIBUTIONS} distributions, <= {MAX_MB} MB; heavy found: {veil['heavy'] or 'none'}; "
          f"researcher imports: {veil['imports']}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "researcher_install.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
