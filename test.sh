#!/usr/bin/env bash
# The tests in one command: install what they need, lint, run them; exactly what CI runs (.ci/run).
exec bash "$(dirname "$0")/.ci/run" "$@"
