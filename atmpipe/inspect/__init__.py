"""`atmpipe inspect`: a feature browser for trained SAEs, written as a self-contained folder of HTML.

extract.py  held-out store → per-latent statistics, top and random contexts, histograms (no LM forward)
weights.py  the model's tied unembedding alone → logit effects; decoder cosines → nearest latents
absorbed.py the per-letter absorption record (main latents, absorbing latents and their words)
page.py     the data files and the one page (page.html: a template with small vanilla JS)
config.py   InspectConfig: the options and their help
run.py      the stage: checks, progress, and the build
"""
