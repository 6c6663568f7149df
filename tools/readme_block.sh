#!/usr/bin/env bash
# Prints the first fenced code block after the line `<!-- NAME -->` of README.md, so that the
# commands the README shows are the commands that run: `make` and CI call the install block
# and the test command through this, and the two can never drift apart.
set -euo pipefail
name="${1:?usage: tools/readme_block.sh NAME}"
readme="$(dirname "${BASH_SOURCE[0]}")/../README.md"
block=$(awk -v marker="<!-- $name -->" '
  $0 == marker { want = 1; next }
  want && /^```/ { fence++; if (fence == 2) exit; next }
  want && fence == 1 { print }' "$readme")
if [ -z "$block" ]; then
  echo "tools/readme_block.sh: README.md has no code block after '<!-- $name -->'" >&2
  exit 1
fi
printf '%s\n' "$block"
