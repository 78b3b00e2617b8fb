# Sourced by scripts/test, scripts/demo and scripts/bench: creates .venv when missing,
# installs the pinned dependencies, and the Prometheus/Alertmanager Debian packages
# when they are missing (e2e tests and the alert path need the real binaries).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
# Re-install only when the project's requirements changed since the last install.
stamp=".venv/.trainguard-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies into .venv (torch is pinned to the CPU wheel here)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  # torch first and pinned, so no other requirement can pull a CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0" >&2
  .venv/bin/python -m pip install -q -e ".[test]" >&2
  echo "$want" > "$stamp"
fi

need_deb() {
  if [ "${TRAINGUARD_SKIP_DEB:-0}" = 1 ]; then return 0; fi
  local missing=()
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v prometheus-alertmanager >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing Debian packages: ${missing[*]}" >&2
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  # The Debian packages start system services; the tests start their own on free ports.
}
need_deb
export PATH="$ROOT/.venv/bin:$PATH"
