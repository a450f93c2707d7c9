"""The policy author's toolkit: explain, policy tests, lint, who-can, diff, fmt and the unused-access report.

Pure logic over the rules (``pdp.core.engine.Rule``) and registry devices; the CLI in
``pdp.cli.policy_commands`` reads files and prints.
"""
