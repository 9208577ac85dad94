#!/usr/bin/env bash
# Installs the Debian packages livemig needs (Debian 12, as root). Idempotent: when
# everything is there it only checks, which takes a fraction of a second.
set -euo pipefail

packages=(
    qemu-system-x86   # the VMM (TCG)
    busybox-static    # the guest's user space
    kmod cpio         # building the initramfs
    gcc libc6-dev make  # static guest programs
    iproute2 nftables iputils-ping  # the test bed and its faults
    util-linux        # setpriv: QEMU starts as livemig-qemu
    python3 python3-venv
    ca-certificates
)

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (apt-get, network namespaces)" >&2
    exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

# The image builder resolves and downloads the guest kernel through apt's lists.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# QEMU starts as this user (setpriv), with its tap, sockets and logs opened for it by
# root: a guest that breaks out of QEMU finds no capabilities and no root files.
if ! getent passwd livemig-qemu >/dev/null; then
    echo "setup: adding system user livemig-qemu (confined QEMUs run as it)"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        livemig-qemu
fi

# QEMU's postcopy destination needs a userfaultfd that takes kernel faults, which
# vm.unprivileged_userfaultfd=0 refuses its user; QEMU (8.1 on) then asks /dev/userfaultfd,
# whose only check is its mode. Only that QEMU gets this group (setpriv --groups), so no
# other QEMU can. devtmpfs forgets the mode at boot: the udev rule keeps it, and setup
# sets it now (a container may run no udev).
if ! getent group livemig-uffd >/dev/null; then
    echo "setup: adding group livemig-uffd (QEMU's postcopy destination, /dev/userfaultfd)"
    groupadd --system livemig-uffd
fi
if [ -d /etc/udev/rules.d ]; then
    echo 'KERNEL=="userfaultfd", GROUP="livemig-uffd", MODE="0660"' \
        >/etc/udev/rules.d/70-livemig-userfaultfd.rules
fi
if [ -c /dev/userfaultfd ]; then
    chgrp livemig-uffd /dev/userfaultfd
    chmod 0660 /dev/userfaultfd
fi
