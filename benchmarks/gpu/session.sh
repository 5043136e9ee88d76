#!/usr/bin/env bash
# The GPU work of a session, as named jobs, each writing JOB.out (its output) and its figures
# under $OUT.
# One device call runs one or more jobs within its 10 minutes; carry .whl (benchmarks/gpu/wheels.sh):
#   bash benchmarks/gpu/session.sh lm_throughput fig5          (~8 min on one H200)
#   PACK_PROCS=6 PACK_ALONE=first bash benchmarks/gpu/session.sh lm_pack   (target <= 10 min: a whole call)
#   bash benchmarks/gpu/session.sh toy_opts                    (the toy step under each setting, ~2 min)
#   bash benchmarks/gpu/session.sh lm_profile toy_once         (LM kernels by category; toy retractions)
#   PROFILE_RUNS="60m:64x32 150m:64x128" bash benchmarks/gpu/session.sh lm_profile   (issue 19: the study's steps, ~2 min)
#   bash benchmarks/gpu/session.sh fig6 fig9
#   bash benchmarks/gpu/session.sh toy_check toy_grid fig2     (CUDA-only toy tests; ~4.5 min)
#   bash benchmarks/gpu/session.sh multi_ddp multi_fsdp         (kind nvidia-h200-x2: issue 10)
#   bash benchmarks/gpu/session.sh fig5_scale                  (issue 19: many calls, resumed; LM_ONLY picks cells; docs/lm_study.md)
#   bash benchmarks/gpu/session.sh lm_speed                    (issue 19: tokens/s, MFU of 150m/60m/20m at the grids' step shapes, ~5 min)
#   SPEED_MODE=max-autotune SPEED_PRESETS="150m 60m" SPEED_SHAPES="64x128 64x32" bash benchmarks/gpu/session.sh lm_speed
#                                                               (issue 19 item 8: autotuned GEMMs with fused epilogues)
#   bash benchmarks/gpu/session.sh lm_stacked                  (issue 19: 1 / 3 / 6 seeds stacked on one axis, 60m and 150m, ~6 min)
#   LM_TIMEOUT=300 bash benchmarks/gpu/session.sh add_grok; LM_TIMEOUT=250 bash benchmarks/gpu/session.sh fig8_retention
#                                                               (issue 19: T_ADD grokking and Fig. 8 in one call)
#   LM_PROCS=1 bash benchmarks/gpu/session.sh lr_scan           (issue 19: 150m vs 60m T_CMP at lr 1e-3 / 6e-3, ~6 min)
#   bash benchmarks/gpu/session.sh fix_lm                      (issue 22: the LM fix, 5 arms x 3 seeds)
#   bash benchmarks/gpu/session.sh profile_switch              (issue 21: a toy run cut on CUDA resumed on CPU, and back)
# $OUT returns at most 8 files: a job leaves two to four (JOB.out, a JSON, a log, NAME.tgz); count
# them before a call (tar the .out files together at the end, as session 6 did).
# LM grids run packed: LM_PROCS (default 6) processes share the GPU, --parallel cells.
# LM grids also leave NAME.tgz (the run folder, ~30 KB): committed to benchmarks/results/resume/,
# the next call (any session) resumes a grid that LM_TIMEOUT cut short. The tar leaves out the
# checkpoints of cells still running (ckpt/: 0.2-2 GB per cell from 20m up, over
# the 16 MiB a returned file may have) and kept final weights: a cut cell restarts next call.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/setup.sh || exit 1
: "${OUT:?set OUT to the folder whose files come back}"
# LM_COMPILE_MODE=default falls back to fused kernels without CUDA graphs
LM_FAST=(--set profile.device=cuda --set "profile.compile_mode=${LM_COMPILE_MODE:-reduce-overhead}" --quiet)

lm_run() {  # NAME CONFIG: one LM grid (resumed from benchmarks/results/resume/NAME.tgz), show --json
    # LM_TAG=T LM_SET="--set size=[20m,4m]": a part of the grid, its own run NAME_T
    local name=$1${LM_TAG:+_$LM_TAG} config=$2
    local dir=/tmp/runs/$name
    mkdir -p /tmp/runs
    local saved=benchmarks/results/resume/$name.tgz
    # a warm machine's folder is the newest state (its cut cells' checkpoints too): extracting the
    # committed tgz over it put back an older log.txt and lost two calls' log lines (2026-12-05)
    if [ -d "$dir" ]; then echo "resuming $dir as this machine left it"
    elif [ -f "$saved" ]; then tar xzf "$saved" -C /tmp/runs; fi
    # a grid cut by LM_TIMEOUT (seconds) still returns its finished cells, to resume next call
    # LM_PROCS processes share the GPU, each taking the next unclaimed cell (--parallel cells):
    # a small model alone leaves the GPU waiting on the host (launches, the n-gram sampler)
    # LM_ONLY="task=add size=[20m,4m]": train only those cells (raretask run --only), in the
    # grid's own run folder: call after call fills one directory
    local only=() o
    for o in ${LM_ONLY:-}; do only+=(--only "$o"); done
    local run=(python3 -m raretask run)
    [ "${LM_PROCS:-6}" -gt 1 ] && run=(python3 -m torch.distributed.run --standalone
        "--nproc_per_node=${LM_PROCS:-6}" -m raretask run)
    time timeout "${LM_TIMEOUT:-560}" "${run[@]}" "$config" --out "$dir" --parallel cells "${LM_FAST[@]}" ${LM_SET:-} "${only[@]}"
    local rc=$?
    tar czf "$OUT/$name.tgz" --exclude=ckpt --exclude=ckpt.old --exclude='.raretask-tmp.*' --exclude='*.safetensors' -C /tmp/runs "$name"
    python3 -m raretask show "$dir" --json >"$OUT/$name.json"
    python3 -m raretask show "$dir"
    COLUMNS=120 python3 -m raretask.report.lm_cost "$dir"  # this call's wall, tokens/s, MFU
    tail -n 40 "$dir/log.txt"  # each group's checkpoints: how far it came, how fast
    return $rc
}

job() {
    case $1 in
        lm_throughput) python3 benchmarks/lm_throughput.py --device cuda --out "$OUT/lm_throughput.json" ;;
        lm_speed)  # issue 19: tokens/s and MFU of the study's sizes at its grids' step shapes
            # one line per run as it ends (a call cut short keeps the runs it finished: session
            # 2026-12-05's first try printed only at the end and lost all of them); the
            # largest model and the T_CMP shape first, since item 8 asks for 60m-150m MFU
            # SPEED_MODE=max-autotune: the same runs under that compile mode, files NAME_MODE
            local d=/tmp/runs/lm_speed p bt mode=${SPEED_MODE:-reduce-overhead} tag=
            [ "$mode" = reduce-overhead ] || tag=_$mode
            mkdir -p "$d"
            for bt in ${SPEED_SHAPES:-64x128 64x32 256x32}; do
                for p in ${SPEED_PRESETS:-150m 60m 20m}; do
                    timeout "${SPEED_RUN_TIMEOUT:-150}" python3 benchmarks/lm_throughput.py \
                        --device cuda --variants raretask --preset "$p" --batch-size "${bt%x*}" \
                        --seq-len "${bt#*x}" --vocab-size 4096 --compile-mode "$mode" \
                        --out "$d/${p}_${bt}$tag.json" >"$d/${p}_${bt}$tag.log" 2>&1 || {
                        echo "$p $bt failed ($?)"; continue; }
                    python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))["variants"][0]
tps, mfu, ms = v["tokens_per_s"], v["mfu"], v["step_ms"]
print(f"{sys.argv[2]:14s} {tps:>12,.0f} tokens/s  MFU {mfu:.3f}  step {ms:.2f} ms")' "$d/${p}_${bt}$tag.json" "${p}_${bt}$tag"
                    tar czf "$OUT/lm_speed.tgz" -C /tmp/runs lm_speed  # kept current: a cut call returns it
                done
            done ;;
        lm_stacked)  # issue 19 item 8: K seeds as one stacked model vs LMTrainer alone (K = 1)
            # STACK_RUNS: PRESET:ROWSxTOKENS each, the costliest cells' shapes first (T_ADD 60m,
            # T_CMP 150m); a line per K as it ends, the tgz rewritten after each run
            local d=/tmp/runs/lm_stacked r p bt
            mkdir -p "$d"
            for r in ${STACK_RUNS:-60m:64x32 150m:64x128 60m:64x128 150m:64x32}; do
                p=${r%:*} bt=${r#*:}
                timeout "${STACK_RUN_TIMEOUT:-240}" python3 benchmarks/lm_stacked.py \
                    --device cuda --preset "$p" --batch-size "${bt%x*}" --seq-len "${bt#*x}" \
                    --stack ${STACK_K:-1 3 6} --out "$d/${p}_${bt}.json" 2>&1 |
                    grep -v Warning | tee "$d/${p}_${bt}.log"
                tar czf "$OUT/lm_stacked.tgz" -C /tmp/runs lm_stacked
            done ;;
        lm_throughput_cudnn) python3 benchmarks/lm_throughput.py --device cuda --variants raretask \
                             --attention cudnn --out "$OUT/lm_throughput_cudnn.json" ;;
        lm_profile)  # kernels by category; PROFILE_RUNS="60m:64x32 150m:64x128": the study's
            # step shapes (vocab 4,096) one by one, each into JOB.out (issue 19 item 8: where a
            # 60m-150m step's time goes); unset: 300m at 8 x 2048, fused projections on and off
            if [ -n "${PROFILE_RUNS:-}" ]; then
                local r p bt
                for r in $PROFILE_RUNS; do
                    p=${r%:*} bt=${r#*:}
                    timeout "${PROFILE_RUN_TIMEOUT:-120}" python3 benchmarks/profile_lm_step.py \
                        --preset "$p" --batch-size "${bt%x*}" --seq-len "${bt#*x}" \
                        --set vocab_size=4096 --compile-mode "${PROFILE_MODE:-default}" --top 12 ||
                        echo "$p $bt failed ($?)"
                done
            else
                python3 benchmarks/profile_lm_step.py &&
                    python3 benchmarks/profile_lm_step.py --set fuse_projections=false
            fi ;;
        lm_pack) python3 benchmarks/lm_pack.py --out /tmp/runs/pack --procs "${PACK_PROCS:-6}" \
                 --alone "${PACK_ALONE:-first,last}" --timeout "${PACK_TIMEOUT:-3600}" &&
                 cp /tmp/runs/pack/lm_pack.json /tmp/runs/pack/lm_pack.log "$OUT/" ;;
        pack_grid) lm_run pack_grid benchmarks/lm_pack_grid.yaml ;;  # lm_pack's grid, resumable, untimed
        fig5) lm_run fig5 configs/fig5_lm_heatmap.yaml ;;
        fig6) lm_run fig6 configs/fig6_lm_schedule.yaml ;;
        fig9) lm_run fig9 configs/fig9_lm_gradients.yaml ;;
        fig5_scale) lm_run fig5_scale configs/fig5_lm_scale.yaml ;;        # 120 cells, ~3 calls
        add_grok) lm_run add_grok configs/fig5_lm_add_grok.yaml ;;         # 8 cells, T_ADD grokking
        lr_scan) lm_run lr_scan configs/fig5_lm_lr_scan.yaml ;;  # 12 cells: 150m/60m T_CMP at lr 1e-3, 6e-3
        fig8_retention) lm_run fig8_retention configs/fig8_lm_retention.yaml ;;  # 24 cells, traced
        fix_lm) lm_run fix_lm configs/fix_lm.yaml && {  # 15 cells (issue 22); then the fix files
                    COLUMNS=100 python3 -m raretask fix configs/fix_lm.yaml --out /tmp/runs/fix_lm \
                        "${LM_FAST[@]}" >"$OUT/fix_lm_table.txt"
                    tar czf "$OUT/fix_lm.tgz" --exclude=ckpt --exclude=ckpt.old --exclude='.raretask-tmp.*' --exclude='*.safetensors' \
                        -C /tmp/runs fix_lm; } ;;
        multi_ddp) python3 benchmarks/lm_multi_gpu.py --out /tmp/runs/mg_ddp --preset 300m --parallel ddp &&
                   cp /tmp/runs/mg_ddp/lm_multi_gpu.json "$OUT/multi_ddp.json" ;;
        multi_fsdp) python3 benchmarks/lm_multi_gpu.py --out /tmp/runs/mg_fsdp --preset 1b --parallel fsdp &&
                    cp /tmp/runs/mg_fsdp/lm_multi_gpu.json "$OUT/multi_fsdp.json" ;;
        toy_phases) python3 benchmarks/profile_toy_step.py --phases --steps 10 &&
                    for w in 64 128 256; do python3 benchmarks/profile_toy_step.py --time-only \
                        --retraction polar --set profile.pad_width=$w; done ;;
        toy_opts) for o in "" "--set profile.share_inputs=true" "--retraction polar_tf32"; do
                      python3 benchmarks/profile_toy_step.py --time-only $o; done
                  python3 benchmarks/profile_toy_step.py --time-only --set profile.share_inputs=true \
                      --retraction polar_tf32 ;;
        toy_once) for r in polar_tf32 polar_once; do  # one third-order polar pass vs two
                      python3 benchmarks/profile_toy_step.py --time-only --retraction $r; done ;;
        toy_check) python3 -m pytest -p no:cacheprovider tests/test_toy_trainer.py \
                       -k "group_streams or share_inputs or retraction" ;;  # CUDA-only tests; addopts has -q (a second hides the count)
        toy_streams) for v in false true; do  # width groups on one stream vs one stream each
                         python3 benchmarks/profile_toy_step.py --time-only --set profile.group_streams=$v; done ;;
        toy_grid) python3 benchmarks/toy_grid.py --device cuda --out "$OUT/toy_grid_cuda.log" ${TOY_SET:-} ;;
        fig2) time timeout "${TOY_TIMEOUT:-560}" python3 -m raretask run configs/fig2_phase.yaml \
                  --out /tmp/runs/fig2_phase --quiet ${FIG2_SET:-}; local rc=$?
              tar czf "$OUT/fig2_phase.tgz" -C /tmp/runs fig2_phase  # show / report here
              return $rc ;;
        profile_switch)  # issue 21: one toy YAML, no edits, killed under one device once it has
                         # a checkpoint, resumed under the other
            for pair in cuda:cpu cpu:cuda; do
                local first=${pair%:*} second=${pair#*:} d=/tmp/runs/switch_${pair/:/_}
                python3 -m raretask run src/raretask/configs/demo_phase.yaml \
                    --out "$d" --set profile.device=$first --checkpoint-seconds 1 --quiet &
                local pid=$! i
                for i in $(seq 1200); do [ -f "$d/groups/g0000/ckpt/manifest.json" ] && break; sleep 0.1; done
                sleep 1; kill -9 $pid; wait $pid
                echo "$first: killed, rc=$?; groups done: $(ls "$d"/groups/*/summary.json 2>/dev/null | wc -l)"
                python3 -m raretask run src/raretask/configs/demo_phase.yaml --out "$d" \
                    --set profile.device=$second --quiet; echo "$second: resumed, rc=$?"
                grep -i "device\|profile\|resum" "$d/log.txt" | head -20
                python3 -m raretask show "$d" | tail -12
            done ;;
        *) echo "error: unknown job $1" >&2; return 2 ;;
    esac
}

status=0
for name in "$@"; do
    echo "== $name $(date -u +%FT%TZ)"
    job "$name" >"$OUT/$name.out" 2>&1 || { status=$?; echo "$name failed ($status)"; }
    tail -n 5 "$OUT/$name.out"
done
exit $status
