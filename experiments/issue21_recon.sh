#!/usr/bin/env bash
# Issue 21's measurements (docs/results.md, "Issue 21"): reconstruction as its references run it.
# Run from the repository root: `bash experiments/issue21_recon.sh STAGE` with STAGE one of
#   val     the cpu activation lrs on the validation split (QDrop's joint stage, BRECQ's stage 2)
#   grid    random/selectq/zeroq/dsg x none/qdrop/brecq x W3A3/W4A4 x seeds 0-2, init=mse
#   adaround  AdaRound on the same sets (BITS=3 or 4 for one bit-width)
#   calib   refine.init=calibrated (the calibration set's own grid instead of the MSE search): QDrop, or the
#           refiners in REFINERS (e.g. REFINERS=adaround,brecq)
#   dfq     data-free reconstruction: gdfq/clusterq + qdrop (the warmed-up generator's images)
#   val2    PLF's eq.-13 layers (stages | hast) and gdfq's refine.lr under kd_reduction=mean, on val
#   all     grid, dfq, val2, then calib and adaround at W3A3, then at W4A4
#   report  the summaries
# Two jobs at a time on two cores; rerunning resumes (finished jobs are skipped). OUT (default
# outputs) holds the sweeps; total times are appended to $OUT/issue21.times.
set -u
export WANDB_MODE=${WANDB_MODE:-disabled}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs}
J="model=resnet20_cifar10 budget=cpu threads=1 progress=false logger.mode=disabled hydra/launcher=joblib \
hydra.launcher.n_jobs=2 paths.cache_dir=$OUT/cache_i21"
timed() { local name=$1; shift; local t0; t0=$(date +%s); "$@"; echo "$name rc=$? seconds=$(( $(date +%s) - t0 ))" >> "$OUT/issue21.times"; }
S=random,selectq,zeroq,dsg
case "${1:-}" in
  val)
    timed val_qdrop $PY -m calibbench -m refine=qdrop bits=3 strategy=random seed=0,1,2 eval_split=val \
      refine.act_lr=0.00004,0.001,0.004 $J hydra.sweep.dir=$OUT/sweeps/i21_val
    timed val_brecq $PY -m calibbench -m refine=brecq bits=3 strategy=random seed=0,1,2 eval_split=val \
      refine.act_lr=0.0004,0.002 $J hydra.sweep.dir=$OUT/sweeps/i21_val ;;
  val2)
    timed val_plf $PY -m calibbench -m strategy=plf bits=4 seed=0,1,2 eval_split=val refine.plf.features=stages,hast \
      $J hydra.sweep.dir=$OUT/sweeps/i21_val
    timed val_gdfq $PY -m calibbench -m strategy=gdfq bits=4 seed=0,1,2 eval_split=val refine.lr=0.0001,0.001 \
      $J hydra.sweep.dir=$OUT/sweeps/i21_val ;;
  grid)
    timed grid_none $PY -m calibbench -m refine=none bits=3,4 strategy=$S seed=0,1,2 $J hydra.sweep.dir=$OUT/sweeps/i21_grid
    timed grid_blocks $PY -m calibbench -m refine=qdrop,brecq bits=3,4 strategy=$S seed=0,1,2 $J \
      hydra.sweep.dir=$OUT/sweeps/i21_grid ;;
  adaround)
    timed adaround $PY -m calibbench -m refine=adaround bits=${BITS:-3,4} strategy=$S seed=0,1,2 $J \
      hydra.sweep.dir=$OUT/sweeps/i21_grid ;;
  calib)
    timed calib $PY -m calibbench -m refine=${REFINERS:-qdrop} refine.init=calibrated bits=${BITS:-3,4} strategy=$S seed=0,1,2 \
      $J hydra.sweep.dir=$OUT/sweeps/i21_grid ;;
  dfq)
    timed dfq $PY -m calibbench -m refine=qdrop bits=3,4 strategy=gdfq,clusterq seed=0,1,2 $J hydra.sweep.dir=$OUT/sweeps/i21_grid ;;
  all)  # the order the measurement ran in (most wanted first)
    bash "$0" grid; bash "$0" dfq; bash "$0" val2; BITS=3 bash "$0" calib; BITS=3 bash "$0" adaround
    BITS=4 bash "$0" calib; BITS=4 bash "$0" adaround; REFINERS=adaround,brecq bash "$0" calib ;;
  report)
    for d in i21_val i21_grid; do $PY -m calibbench report "$OUT/sweeps/$d"; done ;;
  *) echo "usage: bash experiments/issue21_recon.sh val|val2|grid|adaround|calib|dfq|all|report" >&2; exit 2 ;;
esac
