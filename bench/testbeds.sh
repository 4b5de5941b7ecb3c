#!/usr/bin/env bash
# The results tables of docs/RESULTS.md: every method (and the ablations) on both testbeds at 25% and 50% fewer
# experts, from ONE benchmark run (one statistics pass per testbed, every result evaluated against the original
# on the same held-out windows).
#
#   bench/testbeds.sh TRAIN EVAL OUT [extra `moe-compress bench` options, e.g. --device cuda]
#   bench/testbeds.sh ../shared/data/train ../shared/data/eval runs/testbeds --device cuda   (8 min on one H100)
# TRAIN and EVAL are data SPECs. The RESULTS tables used the project's corpus (../shared/data beside the
# checkout; it is not part of a clone). From a clone alone, the bundled samples run the same table on far less
# text (64 calibration rows of 256 tokens; not the RESULTS numbers):
#   N_SAMPLES=64 SEQ_LEN=256 bench/testbeds.sh builtin:demo builtin:demo-eval runs/testbeds-demo
# MODELS=... (one testbed), OURS=... (another list of our variants), METHODS=... (the whole list), N_SAMPLES /
# SEQ_LEN (calibration rows and their length, default 1024 x 512) override the defaults.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 TRAIN EVAL OUT [bench options]" >&2; exit 2; }
train=$1 eval=$2 out=$3
shift 3

pruning="frequency,soft-count,ean,reap,naee,random"
competitors="easy-ep,stun,mone,dern,heapr,premoe,premoe[score=prob]"   # issue #18 (premoe adds :oracle and :all-domain rows)
merging="msmoe,hcsmoe,submoe"
# issue #19: what a merge loses to, piece by piece (docs/methods.md "Measured layer error, oracle grouping, ...")
submoe_switches="submoe[align=true],submoe[rank_ratio=0.5],submoe[whiten=true,rank_ratio=0.5],submoe[router=lstsq],submoe[clustering=hierarchical]"
d="distill_steps=400,distill_batch=16,distill_schedule=cosine"
diagnosis="submoe[clustering=oracle],submoe[clustering=oracle,weighting=measured],msmoe[weighting=measured],msmoe[router=logit_adjust],msmoe[router=lstsq],refit[merge=msmoe],refit[merge=msmoe,$d]"
ours=${OURS:-"refit,refit[select=naee],refit[select=naee,$d],refit[select=naee,refit_down=false,$d]"}

${MOE_COMPRESS:-moe-compress} bench ${MODELS:-builtin:mixtral-8e builtin:deepseek-fine} \
  --methods "${METHODS:-$pruning,$competitors,$merging,$submoe_switches,$diagnosis,$ours}" \
  --ratio 0.25,0.5 --calib "$train" --n-samples "${N_SAMPLES:-1024}" --seq-len "${SEQ_LEN:-512}" \
  --data "$eval" --eval-seq-len 512 --max-windows 32 --batch-size 16 --seed 0 --out "$out" "$@"
