"""What `besa-pl` offers, in words: shared by the light help (cli.py) and the LightningCLI parser
(lightning_cli.py), which must not import each other."""

DESCRIPTION = "besa-pl: prune a causal language model with BESA (or a one-shot baseline), block by block."
SUBCOMMANDS = {
    "fit": "Prune a model and evaluate it as the config's callbacks say (besa-pl fit --config cli.yaml).",
}
