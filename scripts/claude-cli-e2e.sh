#!/usr/bin/env bash
# The real Claude Code CLI, through the proxy, against a fake Ollama that answers with a
# Write tool call: `claude -p "create hello.txt"` must leave hello.txt behind.
# Installs @anthropic-ai/claude-code from npm into .claude-cli/ on first use, then runs the
# opt-in test inside a network namespace with only loopback, so nothing the CLI tries can
# leave the machine. Not part of the default test run.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${CLAUDE_CLI_PREFIX:-.claude-cli}
[ -x "$prefix/node_modules/.bin/claude" ] || npm install --prefix "$prefix" @anthropic-ai/claude-code@latest
CLP_CLAUDE_CLI=$(realpath "$prefix/node_modules/.bin/claude")
export CLP_CLAUDE_CLI
exec unshare -n bash -c 'ip link set lo up && pytest -q -s -k real_claude_cli'
