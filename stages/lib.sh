# Shared by stages/demo.sh and stages/reproduce.sh (sourced, not run).
#
# `stage NAME OUTPUT -- COMMAND...` runs one pipeline stage once: it is skipped when its done-marker exists
# and its OUTPUT is still there; otherwise it runs (the commands resume by themselves: a harvest continues
# from its last committed shard, `atmpipe train --resume` from its last checkpoint), and on success the
# marker is written. Every run appends the exact command to $RECORD/commands.sh and its wall time to
# $RECORD/wall_times.tsv, so a report can say what ran and how long each stage took; a finished stage adds
# its code version (commit and, on a dirty tree, the sha256 of the diff) to $RECORD/provenance.tsv.
# With PLAN_ONLY=1 it runs nothing and writes nothing: it prints one line per stage, NAME <tab> done|todo
# <tab> COMMAND.

ATMPIPE=${ATMPIPE:-.venv/bin/atmpipe}

stage() {
    local name=$1 output=$2
    shift 3 # NAME OUTPUT --
    local marker="$RECORD/done/$name"
    if [[ ${PLAN_ONLY:-} == 1 ]]; then
        printf '%s\t%s\t' "$name" "$([[ -e $marker && -e $output ]] && echo done || echo todo)"
        printf '%q ' "$@"
        echo
        return 0
    fi
    if [[ -e $marker && -e $output ]]; then
        echo "== $name: done already ($output); skipping"
        return 0
    fi
    mkdir -p "$RECORD/done"
    echo "== $name: $*"
    local code
    code=$(code_version) # as the stage starts: the code it ran
    printf '%q ' "$@" >>"$RECORD/commands.sh"
    echo >>"$RECORD/commands.sh"
    local start=$SECONDS status=0
    "$@" || status=$?
    printf '%s\t%d\t%s\t%s\n' "$name" $((SECONDS - start)) "$([[ $status == 0 ]] && echo ok || echo "exit $status")" \
        "$(date -u +%FT%TZ)" >>"$RECORD/wall_times.tsv"
    if [[ $status != 0 ]]; then
        echo "== $name failed (exit $status); fix the cause and re-run: finished stages are kept" >&2
        return "$status"
    fi
    printf '%s\t%s\t%s\n' "$name" "$code" "$(date -u +%FT%TZ)" >>"$RECORD/provenance.tsv"
    touch "$marker"
}

# The commit the work tree is at, and the sha256 of `git diff HEAD` when tracked files differ from it ("-" when
# clean): with both, the code a stage ran can be checked out again.
code_version() {
    local commit diff=-
    commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        diff=$(git diff HEAD | sha256sum | cut -c1-64)
    fi
    printf '%s\t%s\n' "$commit" "$diff"
}

# Total wall seconds per stage, summed over interrupted and resumed runs.
wall_summary() {
    awk -F'\t' '{t[$1] += $2; all += $2} END {for (s in t) printf "%-28s %6d s\n", s, t[s]; printf "%-28s %6d s\n", "total", all}' \
        "$RECORD/wall_times.tsv" | sort
}
