# The four DEMO SAEs (`make demo`: 200 steps of 1024 tokens, d_sae 2560, gemma-3-270m layer 9), evaluated with
# probing and TPP at a subset that fit 2 heavily shared cores on 2026-12-07 (load average 35-55), NOT the
# reproduction's sizes (stages/reproduce-eval.toml) for probing and TPP; SCR at its full size.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
S="--sae runs/demo/atm --sae runs/demo/topk --sae runs/demo/jumprelu --sae runs/demo/relu --store cache/demo-l9.zarr"
TASKS=hist_fig_ismale,hist_fig_isamerican,hist_fig_ispolitician,us_state_ca,us_timezone_new_york,world_country_us,art_type_book,athlete_basketball,nyc_manhattan,cola_grammatical,sst2,commonsense_true,headline_trump,headline_frontpage,headline_china,headline_iran,click_bait,tweet_happiness,tweet_sadness,tweet_worry,sciq_true,deontology_valid,bigram_high_school,arith_answer_a,code_python
nice -n 10 atmpipe eval $S --metrics probing --probing-tasks $TASKS --probing-train 24 --probing-test 24 \
    --probing-context 64 --out reports/demo-probing
nice -n 10 atmpipe eval $S --metrics tpp --tpp-sets art_type,athlete_sport,science_category --probing-context 64 \
    --tpp-train 64 --tpp-test 32 --out reports/demo-tpp
nice -n 10 atmpipe eval $S --metrics bias --out reports/demo-bias
python stages/probing_summary.py "Demo SAEs (make demo): sparse probing, SCR and TPP at the sizes today's shared cores allowed" reports/demo-probing/results.json \
    reports/demo-bias/results.json reports/demo-tpp/results.json > results/gemma-3-270m-l9-demo/probing/summary.md
