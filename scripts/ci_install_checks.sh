#!/usr/bin/env bash
# CI: prove what pyproject.toml claims about installs, with packages written by the full .venv.
#  1. a base-only venv (`pip install .`): every command that needs an extra exits 2 with the
#     `pip install 'stlm[...]'` hint; generate/bench run fp32, bf16-concat and int4 packages;
#  2. a floor venv (every base dependency at its pyproject floor, Python 3.10 when available):
#     the default package generates, and a package that needs a newer onnxruntime says so.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/stlm-ci-install.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STLM=(.venv/bin/stlm -q)
fail() { echo "ci_install_checks: FAIL: $*" >&2; exit 1; }

echo "== packages (full venv)" >&2
"${STLM[@]}" make-checkpoint -o "$WORK/ckpt" --preset tiny --tokenizer stlm/assets/gpt-neox-20b/tokenizer.json >/dev/null
"${STLM[@]}" export "$WORK/ckpt" -o "$WORK/fp32" >/dev/null
"${STLM[@]}" export "$WORK/ckpt" -o "$WORK/bf16-concat" --dtype bf16 --kv-cache concat >/dev/null
"${STLM[@]}" export "$WORK/ckpt" -o "$WORK/int4" --quantize int4 >/dev/null
expected="$(.venv/bin/stlm generate "$WORK/fp32" -p "Hello world" -n 8 -t 0)"
"${STLM[@]}" verify "$WORK/ckpt" "$WORK/fp32" --prompts 1 --save-reference "$WORK/ref.json" >/dev/null
for _ in $(seq 60); do echo "the quick brown fox jumps over the lazy dog."; done >"$WORK/text.txt"

# expect_extra EXTRA CMD...: exit status 2, `error:` first, the pip hint, no traceback.
expect_extra() {
    local extra="$1"; shift
    local status=0
    "$@" >"$WORK/out" 2>"$WORK/err" || status=$?
    [[ $status -eq 2 ]] || { cat "$WORK/err" >&2; fail "'$*' exited $status, expected 2 (missing extra $extra)"; }
    head -c 6 "$WORK/err" | grep -q '^error:' || { cat "$WORK/err" >&2; fail "'$*' did not start its message with error:"; }
    grep -q "pip install 'stlm\[$extra\]'" "$WORK/err" || { cat "$WORK/err" >&2; fail "'$*' did not name stlm[$extra]"; }
    if grep -q Traceback "$WORK/err"; then fail "'$*' printed a traceback"; fi
    echo "  ok: $* -> exit 2, needs stlm[$extra]" >&2
}

echo "== base-only venv" >&2
python3 -m venv "$WORK/base"
"$WORK/base/bin/python" -m pip install -q --upgrade pip
"$WORK/base/bin/python" -m pip install -q -c constraints.txt "$ROOT"
B="$WORK/base/bin/stlm"
expect_extra export "$B" export "$WORK/ckpt" -o "$WORK/never"
expect_extra export "$B" demo --workdir "$WORK/demo"
expect_extra serve "$B" serve "$WORK/fp32"
expect_extra reference "$B" verify "$WORK/ckpt" "$WORK/fp32"
expect_extra eval "$B" eval "$WORK/fp32" --tasks stlm_shakespeare_mc
expect_extra ray "$B" serve "$WORK/fp32" --replicas 2
expect_extra export "$B" build-engine "$WORK/fp32" -o "$WORK/never"
expect_extra reference "$B" perplexity "$WORK/fp32" "$WORK/text.txt" --reference "$WORK/ckpt"
[[ ! -e "$WORK/never" ]] || fail "a refused export left $WORK/never behind"
for pkg in fp32 bf16-concat int4; do
    "$B" generate "$WORK/$pkg" -p "Hello world" -n 8 -t 0 >/dev/null || fail "base venv cannot generate with $pkg"
    echo "  ok: generate $pkg" >&2
done
[[ "$("$B" generate "$WORK/fp32" -p "Hello world" -n 8 -t 0)" == "$expected" ]] || fail "base venv generates other text"
"$B" bench "$WORK/int4" --prompt-len 8 --gen-len 4 --runs 1 --warmup 0 --json >/dev/null || fail "base venv cannot bench"
echo "  ok: bench int4" >&2
"$B" -q verify "$WORK/ref.json" "$WORK/fp32" >/dev/null || fail "base venv cannot verify against a saved reference"
"$B" -q perplexity "$WORK/fp32" "$WORK/text.txt" --ctx 32 --chunks 2 >/dev/null || fail "base venv cannot run perplexity"
"$B" -q make-checkpoint -o "$WORK/base-ckpt" --preset tiny >/dev/null || fail "base venv cannot make a checkpoint"
echo "  ok: verify REF.json, perplexity, make-checkpoint" >&2

echo "== floor venv (base dependencies at their pyproject floors)" >&2
# The oldest Python that requires-python admits, when this machine has it (pyenv keeps it aside).
FLOOR_PY="python3"
for candidate in python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if "$candidate" -c "" >/dev/null 2>&1; then FLOOR_PY="$candidate"; break; fi
done
"$FLOOR_PY" -m venv "$WORK/floor"
.venv/bin/python - "$WORK/floor.txt" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = [re.sub(r"\s*>=\s*", "==", d) for d in deps if ">=" in d]
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("floors:", ", ".join(pins), file=sys.stderr)
PY
"$WORK/floor/bin/python" -m pip install -q --upgrade pip
"$WORK/floor/bin/python" -m pip install -q -r "$WORK/floor.txt" "$ROOT"
echo "  $("$WORK/floor/bin/python" --version), onnxruntime $("$WORK/floor/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)')" >&2
F="$WORK/floor/bin/stlm"
[[ "$("$F" generate "$WORK/fp32" -p "Hello world" -n 8 -t 0)" == "$expected" ]] || fail "the floor venv generates other text"
echo "  ok: default package generates the same text on the floors" >&2
for pkg in bf16-concat int4; do
    status=0
    "$F" generate "$WORK/$pkg" -p "Hello world" -n 8 -t 0 >/dev/null 2>"$WORK/err" || status=$?
    if [[ $status -eq 0 ]]; then
        echo "  ok: generate $pkg" >&2
    elif [[ $status -eq 2 ]] && grep -q "needs onnxruntime >=" "$WORK/err"; then
        echo "  ok: $pkg refused: $(head -1 "$WORK/err")" >&2
    else
        cat "$WORK/err" >&2; fail "the floor venv failed on $pkg (exit $status)"
    fi
done
echo "ci_install_checks: all passed" >&2
