# toa's %postun. After an upgrade ($1 >= 1) a running service restarts without unloading, so
# that the new version takes over and no open connection loses its client.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 1 ] && systemctl is-active --quiet toa.service; then
        # The running toa reads the marker when it stops (toa::service::KEEP_LOADED_MARKER).
        mkdir -p /run/toa
        touch /run/toa/keep-loaded
        systemctl restart toa.service || status=$?
        rm -f /run/toa/keep-loaded
        exit ${status:-0}
    fi
fi
if [ "$1" -eq 0 ]; then
    rmdir /run/toa 2>/dev/null || :
fi
