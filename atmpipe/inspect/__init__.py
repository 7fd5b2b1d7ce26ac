"""`atmpipe inspect`: a feature browser for trained SAEs, written as a self-contained folder of HTML.

extract.py  held-out store → per-latent statistics, top and random contexts, histograms, co-activation
            (no LM forward)
weights.py  the model's tied unembedding alone → logit effects and their histogram; decoder cosines →
            nearest latents
absorbed.py the per-letter absorption record (main latents, absorbing latents and their words)
page.py     the data files and the one page (page.html: a template with small vanilla JS)
texts.py    --text: the user's own texts through the LM and the SAEs
serve.py    --serve: the browser on 127.0.0.1 with a live text box (Flask)
config.py   InspectConfig: the options and their help
run.py      the stage: checks, progress, and the build
"""
