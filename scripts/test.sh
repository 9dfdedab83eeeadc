#!/usr/bin/env bash
# Run the test suite (README command 2): install what the tests need when it is missing, then run
# pytest offline. Arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` (the fast lane).
#
# Installs, when absent:
#   * the package with its [dev] extra (pip install -e ".[dev]"), only inside a virtual environment;
#   * a headless browser for tests/test_report_browser.py: Debian's chromium (apt-get, as root or
#     through passwordless sudo).
# When it cannot install something it stops with one line saying what to install: no test is
# skipped for want of it.
set -euo pipefail
cd "$(dirname "$0")/.."
me="scripts/test.sh"
die() { echo "$me: $*" >&2; exit 1; }

command -v python >/dev/null 2>&1 \
  || die 'no python on PATH: run README command 1 (python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]")'

# --- Python packages: pyproject.toml's dependencies and its [dev] extra
missing=$(python - <<'PY'
import sys
from importlib import metadata


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


try:
    import tomllib
    from packaging.requirements import Requirement
except ImportError:  # Python 3.10, or nothing installed yet: check the package and pytest only
    print(" ".join(n for n in ("rahf", "pytest") if installed(n) is None))
    sys.exit()
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = project["optional-dependencies"]
reqs, todo, seen = [Requirement(r) for r in project["dependencies"]], ["dev"], set()
while todo:  # the dev extra and the extras it names (rahf[all] -> rahf[train,...])
    extra = todo.pop()
    seen.add(extra)
    for r in map(Requirement, extras[extra]):
        if r.name == project["name"]:
            todo += [e for e in r.extras if e not in seen]
        else:
            reqs.append(r)
missing = [] if installed(project["name"]) else [project["name"]]
for r in reqs:
    v = installed(r.name)
    if v is None or not r.specifier.contains(v, prereleases=True):
        missing.append(str(r))
print(" ".join(dict.fromkeys(missing)))
PY
) || die "python could not check the installed packages (error above)"
if [ -n "$missing" ]; then
  [ -n "${VIRTUAL_ENV:-}" ] \
    || die "missing Python packages ($missing): activate the virtual environment and run pip install -e \".[dev]\""
  echo "$me: installing the [dev] extra (missing: $missing)" >&2
  python -m pip install -q -e ".[dev]"
fi

# --- a headless browser for the HTML page tests (Debian's chromium)
have_browser() {
  local b
  for b in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$b" >/dev/null 2>&1 && return 0
  done
  return 1
}
if ! have_browser; then
  sudo=""
  can_install=0
  if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
      can_install=1
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
      can_install=1
    fi
  fi
  [ "$can_install" -eq 1 ] \
    || die "the browser tests need a headless chromium: install it (Debian/Ubuntu: sudo apt-get install chromium) and rerun"
  echo "$me: installing Debian's chromium (apt-get) for the browser tests" >&2
  log=$(mktemp "${TMPDIR:-/tmp}/rahf-apt.XXXXXX")
  { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$log" 2>&1 \
    || die "apt-get could not install chromium (log: $log): install a headless chromium and rerun"
  rm -f "$log"
  have_browser || die "apt-get installed chromium but none is on PATH: install a headless chromium and rerun"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -q "$@"
