#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine (Python >= 3.11 and a Rust toolchain present):
# the offline text corpus (Debian's Python docs), chromium for the chat app's browser test, a
# virtualenv in .venv, and this package with its Rust extension, test dependencies and the hf extra
# (torch + transformers: export_hf / import_hf). Safe to rerun: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")"

if ! ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  # python3.11-doc on Debian 12; other releases ship their own python3.X-doc behind python3-doc
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3.11-doc \
    || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-doc
fi

# The spelling tasks' word list (nanochat_jax/tasks/synthetic.py): Debian's wamerican
if [ ! -f /usr/share/dict/american-english ]; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wamerican
fi

# Debian's chromium for the chat app's browser test (Playwright drives it; it never downloads browsers)
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,hf]"
