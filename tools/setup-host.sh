#!/usr/bin/env bash
# Installs the Debian packages livemig needs (Debian 12 or 13, as root). Idempotent: when
# everything is there it only checks, which takes a fraction of a second.
#
# QEMU must be 10.0 or newer: it is what we run on and what we compare against. Debian 13
# has it in main. On Debian 12 it comes from bookworm-backports: this script adds that one
# suite (a deb822 file of ours, on the mirror the machine already uses) and pins only
# QEMU's own packages to it, so nothing else on the machine is taken from backports.
set -euo pipefail

QEMU_MIN_MAJOR=10
qemu_packages=(qemu-system-x86 qemu-utils)  # the VMM (TCG); qemu-img and qemu-nbd
packages=(
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

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
backports_list=/etc/apt/sources.list.d/livemig-backports.sources
backports_pin=/etc/apt/preferences.d/livemig-qemu

# The URI and keyring of the machine's own entry for the main suite, from deb822 files or
# one-line sources.list entries, as they stand: we add a suite, never a mirror.
debian_mirror() {
    local suite=$1 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && [ "$f" != "$backports_list" ] || continue
        awk -v suite="$suite" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uri != "")
                    { print uri "\t" key; found = 1; exit }
                types = suites = uri = key = ""
            }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:"     { $1 = ""; types = $0 }
            tolower($1) == "suites:"    { $1 = ""; suites = $0 }
            tolower($1) == "uris:"      { uri = $2 }
            tolower($1) == "signed-by:" { key = $2 }
            END { if (!found) flush() }' "$f" | head -n 1
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [opts] URI SUITE COMPONENTS...
        awk -v suite="$suite" '$1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i "\t"; exit } }' "$f"
    done
}

qemu_major() {
    { qemu-system-x86_64 --version 2>/dev/null || true; } | sed -nE '1s/.*version ([0-9]+)\..*/\1/p'
}

apt_updated=
if [ "$codename" = bookworm ] && [ ! -f "$backports_list" ]; then
    mirror=$(debian_mirror bookworm | head -n 1)
    uri=${mirror%%$'\t'*}
    key=${mirror#*$'\t'}
    if [ -z "$uri" ]; then
        echo "setup: no apt source for Debian's bookworm suite found in /etc/apt; add one, or" \
            "add bookworm-backports yourself, then run this again (QEMU ${QEMU_MIN_MAJOR} comes" \
            "from there)" >&2
        exit 1
    fi
    echo "setup: adding bookworm-backports from $uri for QEMU's packages only"
    {
        echo "# Added by livemig's tools/setup-host.sh: QEMU ${QEMU_MIN_MAJOR} comes from here."
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [ -z "$key" ] || echo "Signed-By: $key"
    } >"$backports_list"
    # Backports stays at apt's default priority 100 for every other package; these are
    # QEMU and the firmware its 10.0 depends on at newer versions.
    cat >"$backports_pin" <<'PIN'
# Added by livemig's tools/setup-host.sh: only QEMU's own packages from bookworm-backports.
Package: qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui qemu-utils qemu-block-extra qemu-block-support seabios
Pin: release n=bookworm-backports
Pin-Priority: 990
PIN
    apt-get update -qq
    apt_updated=1
fi

missing=()
major=$(qemu_major)
if [ -z "$major" ] || [ "$major" -lt "$QEMU_MIN_MAJOR" ]; then
    missing+=("${qemu_packages[@]}")
fi
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

# The image builder resolves and downloads the guest kernel through apt's lists.
if [ -z "$apt_updated" ] && { [ ${#missing[@]} -gt 0 ] \
        || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; }; then
    apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

major=$(qemu_major)
if [ -z "$major" ] || [ "$major" -lt "$QEMU_MIN_MAJOR" ]; then
    echo "setup: QEMU here is $(qemu-system-x86_64 --version 2>/dev/null | head -n 1 || echo missing);" \
        "livemig needs ${QEMU_MIN_MAJOR}.0 or newer. On Debian 12 it comes from bookworm-backports" \
        "($backports_list, pinned by $backports_pin): check that apt reaches it, then" \
        "'apt-get install -t bookworm-backports qemu-system-x86 qemu-utils'; on Debian 13 it is" \
        "in main." >&2
    exit 1
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
