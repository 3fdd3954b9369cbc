"""Checkpoint reading and writing (floor 2 of docs/architecture.md). Each module is imported by name
(`moeinfer.loading.checkpoint`, `moeinfer.loading.save`, ...); nothing here."""
