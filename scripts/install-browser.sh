#!/usr/bin/env bash
# The browser the console's tests drive (tests/test_console_browser.py): Debian's chromium, and
# the npm package playwright-core, pinned, in .tools/browser/ (playwright-core never downloads a
# browser; the tests launch /usr/bin/chromium). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.65.1
dir=.tools/browser
if ! command -v chromium >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium npm >/dev/null
fi
installed=$(node -p "require('./$dir/node_modules/playwright-core/package.json').version" 2>/dev/null || true)
if [ "$installed" != "$version" ]; then
    mkdir -p "$dir"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund --prefix "$dir" \
        "playwright-core@$version" >/dev/null
fi
