#!/bin/bash
# Quickstart tokens/s of another checkout ($1, e.g. the commit before a change) and this
# one, in 3 alternating rounds of separate processes (benchmarks/train_step.py each).
#   git worktree add /tmp/routed-base e4833c8 && bash benchmarks/quickstart_before_after.sh /tmp/routed-base
set -e
before=$(cd "$1" && pwd); after=$(cd "$(dirname "$0")/.." && pwd)
for round in 1 2 3; do
  for checkout in "$before" "$after"; do
    configs=configs/switch_base.py:tiny
    if [ "$checkout" = "$after" ]; then
      configs=$configs,configs/switch_base.py:tiny+data.cross_document_attention=true
    fi
    (cd "$checkout" && PYTHONPATH="$checkout" python benchmarks/train_step.py \
        --configs=$configs --steps=20 --rounds=2 2>/dev/null | grep '^| configs' |
        sed "s#^#round $round $checkout #")
  done
done
