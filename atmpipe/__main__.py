from atmpipe.cli import app

app()
