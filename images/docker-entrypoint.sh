#!/bin/sh
# Entrypoint of the atropos-sandbox Docker image.
#   no arguments, or options only  -> the sandbox server with the image defaults, options appended
#                                     (a later --port/--host/--data-dir overrides the default)
#   anything else                  -> run as given, e.g. `atropos-sandbox server ...` or `bash`
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- atropos-sandbox server --host 0.0.0.0 --port 8080 --data-dir /data "$@"
fi
exec "$@"
