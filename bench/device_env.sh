# Source this on the GPU machine (from the repo root) before a benchmark: it installs the wheels
# carried in .whl/ that the machine's image lacks (grain, ml-collections, ...) into /tmp/site and
# unpacks the Rust extension from the carried abi3 wheel of this package next to its sources.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v nanochat_jax) || return 1
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY'
import glob, zipfile
whl = zipfile.ZipFile(glob.glob(".whl/nanochat_jax-*.whl")[0])
for name in whl.namelist():
    if name.startswith("nanochat_jax/_rustbpe"):
        open(name, "wb").write(whl.read(name))
PY
export PYTHONUNBUFFERED=1
