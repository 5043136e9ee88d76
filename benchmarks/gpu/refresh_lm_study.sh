#!/usr/bin/env bash
# After a device call of the LM study (issue 19), on this machine: keep what came back and redraw
# what the repository shows from it.
#   bash benchmarks/gpu/refresh_lm_study.sh save FILES_AT      # seconds: the tgz the next call resumes
#   bash benchmarks/gpu/refresh_lm_study.sh redraw             # minutes: snapshots, tables, report
# `save` first, and commit, before the next call: the device copies the working tree, and a call
# that resumes an older tgz trains finished cells again. `redraw` can run while the next call does.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=benchmarks/results
PY=${PY:-.venv/bin/python}
# job name in session.sh -> the grid's config name (the committed folders are named after it)
declare -A GRID=([fig5_scale]=fig5_lm_scale [fig8_retention]=fig8_lm_retention
                 [lr_scan]=fig5_lm_lr_scan)

save() {  # FILES_AT: copy each returned grid tgz to resume/ (the next call extracts it)
    local from=${1:?the files_at folder of the call} job found=0
    for job in "${!GRID[@]}"; do
        [ -f "$from/$job.tgz" ] || continue
        cp "$from/$job.tgz" "$R/resume/$job.tgz"
        echo "saved $R/resume/$job.tgz"; found=1
    done
    [ "$found" = 1 ] || { echo "error: no grid tgz (${!GRID[*]}) in $from" >&2; exit 2; }
}

redraw() {  # each grid's folder as it stands, its show/seeds tables, the report, the calibration
    local job name dir tmp suffix inputs=()
    # fig5_scale first: the held-out calibration below reads the first folder
    for job in fig5_scale fig8_retention lr_scan; do
        name=${GRID[$job]}
        [ -f "$R/resume/$job.tgz" ] || continue  # a grid no call has started yet
        tmp=$(mktemp -d)
        tar xzf "$R/resume/$job.tgz" -C "$tmp"
        rm -f "$tmp/$job/.lock"
        # a finished grid has its merged tables; until then it is the "_partial" snapshot
        suffix=_partial
        [ -f "$tmp/$job/summary.json" ] && suffix=
        dir=$R/$name$suffix
        rm -rf "$dir" && mv "$tmp/$job" "$dir" && rm -rf "$tmp"
        [ -z "$suffix" ] && rm -rf "$R/${name}_partial" "$R/${name}_partial_show.json" \
            "$R/${name}_partial_seeds.txt" "$R/${name}_partial_cost.txt"
        $PY -m raretask show "$dir" --json >"$dir"_show.json
        COLUMNS=200 $PY -m raretask.report.lm_seeds "$dir" >"$dir"_seeds.txt
        COLUMNS=120 $PY -m raretask.report.lm_cost "$dir" >"$dir"_cost.txt
        inputs+=("$dir")
        echo "$dir: $(ls "$dir"/groups/*/summary.json | wc -l) cells finished"
    done
    $PY -m raretask report $R/fig5_lm_heatmap $R/fig6_lm_schedule $R/fig9_lm_gradients \
        $R/fig5_lm_add_grok_20m_4m $R/fix_lm "${inputs[@]}" --partial \
        --out $R/lm_study_report.html --title "raretask: the language-model study"
    $PY -m raretask calibrate $R/fig5_lm_heatmap $R/fig6_lm_schedule $R/fig9_lm_gradients \
        $R/lm_pack/packed --holdout "${inputs[0]}" --out $R/lm_calibration_heldout_scale.json
}

case ${1:-} in
    save) save "${2:-}" ;;
    redraw) redraw ;;
    *) echo "usage: $0 save FILES_AT | redraw" >&2; exit 2 ;;
esac
