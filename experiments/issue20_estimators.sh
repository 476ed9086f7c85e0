#!/usr/bin/env bash
# Issue 20's measurements (docs/results.md, "Issue 20"): the range estimator as a comparison axis.
# Run from the repository root; two jobs at a time on two cores; rerunning resumes (finished jobs
# are skipped). Total times are appended to outputs/issue20.times.
set -u
export WANDB_MODE=${WANDB_MODE:-disabled}
PY=${PY:-.venv/bin/python}
J="hydra/launcher=joblib hydra.launcher.n_jobs=2 threads=1 progress=false"
timed() { local name=$1; shift; local t0; t0=$(date +%s); "$@"; echo "$name rc=$? seconds=$(( $(date +%s) - t0 ))" >> outputs/issue20.times; }
# 1. every calibration strategy x minmax/percentile/mse/aciq x W3A3/W4A4 x 5 seeds, resnet20 (200 jobs)
timed estimators $PY -m calibbench -m sweep=estimators model=resnet20_cifar10 $J hydra.sweep.dir=outputs/sweeps/i20_estimators
# 2. random's 50-seed spread under mse (the other strategies' mse seeds 0-4 are in 1.)
timed variance_mse $PY -m calibbench -m sweep=variance strategy=random quant.act_observer=mse $J hydra.sweep.dir=outputs/sweeps/i20_variance_mse
# 3. resnet56 at 3 seeds, reduced to random/selectq/zeroq x minmax/mse (time on 2 cores)
timed estimators_r56 $PY -m calibbench -m sweep=estimators model=resnet56_cifar10 'seed=range(0,3)' strategy=random,selectq,zeroq \
    'quant.act_observer=minmax,mse' $J hydra.sweep.dir=outputs/sweeps/i20_estimators_r56
# 4. the validation-split decisions (estimator, reduce, p, weights)
timed estimators_val $PY -m calibbench -m sweep=estimators_val $J hydra.sweep.dir=outputs/sweeps/i20_val
for d in i20_estimators i20_variance_mse i20_estimators_r56 i20_val; do $PY -m calibbench report outputs/sweeps/$d; done
