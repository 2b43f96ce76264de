from appliance.cli import cli

cli()
