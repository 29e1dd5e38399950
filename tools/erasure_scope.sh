#!/usr/bin/env bash
# ESD's scope on the bundled model: one model for the first 3 memorized titles (the study's scope)
# against one model per title (the reference's), each at the reference's settings, then 50 DoRI
# steps on each fine-tuned model. 4 seeds, DDIM 20, as the study's bundled settings.
#
#   tools/erasure_scope.sh OUT [METHOD] [TITLES]   (METHOD: esd, the default, or ca; TITLES: a file with
#                                                    3 titles, one per line; default: the first 3 memorized)
#
# DORI and PYTHON name the commands (default: dori and python on the PATH, e.g. an activated .venv).
# Writes OUT/set, OUT/t0..t2 (dori mitigate runs), OUT/*_dori (dori attack runs) and OUT/times.txt.
set -eu
out=${1:?usage: tools/erasure_scope.sh OUT [METHOD]}
method=${2:-esd}
titles_file=${3:-}
dori=${DORI:-dori}
mkdir -p "$out"
${PYTHON:-python} - "$out" "$titles_file" <<'PY'
import sys
from dori.prompts import load_prompt_set

out, given = sys.argv[1], sys.argv[2]
if given:
    titles = [line.strip() for line in open(given) if line.strip()][:3]
else:
    titles = load_prompt_set("bundled:memorized").texts[:3]
open(f"{out}/set.txt", "w").write("\n".join(titles) + "\n")
for i, title in enumerate(titles):
    open(f"{out}/t{i}.txt", "w").write(title + "\n")
PY
for name in set t0 t1 t2; do
  start=$(date +%s)
  $dori mitigate --method "$method" --prompts "$out/$name.txt" --seeds 4 --steps 20 --out "$out/$name"
  mid=$(date +%s)
  $dori attack --model "$out/$name/model" --prompts "$out/$name.txt" --seeds 4 --eval-steps 20 --steps 50 \
    --steps-curve 0,50 --no-control --out "$out/${name}_dori"
  end=$(date +%s)
  echo "$name $method $((mid - start)) s, dori $((end - mid)) s" >> "$out/times.txt"
done
