"""A test plugin that misbehaves on purpose (see the README)."""
