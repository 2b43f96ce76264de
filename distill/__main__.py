from distill.cli import distill

distill(prog_name="python -m distill")
