"""The policy as authors write it: loading, validation, and Casbin as an independent oracle."""
