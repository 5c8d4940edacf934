# toa's %post: installing attaches nothing; the operator enables the service when ready.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
if [ "$1" -eq 1 ]; then
    # Two commands: CentOS 7's systemd 219 has no `enable --now`.
    echo "toa: installed, nothing attached; start it with: systemctl enable toa && systemctl start toa"
fi
