"""Pure: topics, rules, the compiled index, identity, admission and enforcement. No I/O."""
