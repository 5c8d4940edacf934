# toa's %post: installing attaches nothing (systemctl enable --now toa when ready).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
fi
if [ "$1" -eq 1 ]; then
    echo "toa: installed, nothing attached; start it with: systemctl enable --now toa"
fi
