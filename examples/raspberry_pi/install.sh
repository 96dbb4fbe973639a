#!/usr/bin/env bash
# Install edgeship-agent on a Raspberry Pi (Raspberry Pi OS Bookworm 64-bit) or a Jetson:
# a virtualenv with edgeship[agent] (or a LiteRT runtime), the service user, the directories,
# agent.toml and the systemd unit, then `edgeship-agent check` on the bundle.
#
# Safe to run again: an existing virtualenv is reused and upgraded, an existing agent.toml or
# agent.env is never overwritten, the user is created only if missing. Run
#   bash install.sh --help
# for every option. Tests run it inside an emulated aarch64 Pi (tests/test_pi_example.py).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# --- settings: command line > environment > default ------------------------------------------
PREFIX=${EDGESHIP_PREFIX:-/opt/edgeship}
VENV=${EDGESHIP_VENV:-}
CONFIG_DIR=${EDGESHIP_CONFIG_DIR:-/etc/edgeship}
STATE_DIR=${EDGESHIP_STATE_DIR:-/var/lib/edgeship}
UNIT_DIR=${EDGESHIP_UNIT_DIR:-/etc/systemd/system}
SERVICE_USER=${EDGESHIP_USER:-edgeship}
PYTHON=${EDGESHIP_PYTHON:-python3}
EMULATOR=${EDGESHIP_EMULATOR:-}
PACKAGE=${EDGESHIP_PACKAGE:-edgeship}
FIND_LINKS=${EDGESHIP_FIND_LINKS:-}
OFFLINE=${EDGESHIP_OFFLINE:-0}
PIP_WHEEL=${EDGESHIP_PIP_WHEEL:-}
RUNTIME=${EDGESHIP_RUNTIME:-onnxruntime}
SYSTEM_SITE=${EDGESHIP_SYSTEM_SITE_PACKAGES:-0}
BUNDLE=${EDGESHIP_BUNDLE:-}
SKIP_SYSTEMD=${EDGESHIP_SKIP_SYSTEMD:-0}
START=${EDGESHIP_START:-0}

usage() {
	cat <<'EOF'
usage: install.sh [options]

Installs edgeship-agent into a virtualenv, creates the service user and directories, installs
agent.toml (never overwriting one) and the systemd unit, and checks a bundle if one is given.
Every option can also be set in the environment (shown in brackets); options win.

Where things go
  --prefix DIR          install root; the virtualenv is DIR/venv [EDGESHIP_PREFIX]
                        (default /opt/edgeship)
  --venv DIR            the virtualenv itself [EDGESHIP_VENV] (default PREFIX/venv)
  --config-dir DIR      agent.toml and agent.env [EDGESHIP_CONFIG_DIR] (default /etc/edgeship)
  --state-dir DIR       the agent's spool and sequence numbers [EDGESHIP_STATE_DIR]
                        (default /var/lib/edgeship)
  --unit-dir DIR        where edgeship-agent.service goes [EDGESHIP_UNIT_DIR]
                        (default /etc/systemd/system)
  --user NAME           the service user, created as a system user [EDGESHIP_USER]
                        (default edgeship)

What is installed
  --package SPEC        what pip installs: a name with an optional version (edgeship,
                        edgeship==0.1.0), or a local wheel or source directory
                        [EDGESHIP_PACKAGE] (default edgeship, from the package index)
  --runtime NAME        onnxruntime (default): edgeship[agent];
                        litert: ai-edge-litert, or tflite-runtime when the virtualenv already
                        has numpy<2 (e.g. Debian's numpy through --system-site-packages);
                        tflite: numpy<2 with tflite-runtime 2.14 (its last release);
                        none: no runtime (bring your own, e.g. Jetson's onnxruntime-gpu)
                        [EDGESHIP_RUNTIME]
  --system-site-packages
                        let the virtualenv see the system's packages (apt's python3-numpy,
                        NVIDIA's onnxruntime-gpu wheel on a Jetson) [EDGESHIP_SYSTEM_SITE_PACKAGES=1]
  --find-links DIR      also look for wheels in DIR [EDGESHIP_FIND_LINKS]
  --offline             never contact a package index: install only from --find-links and
                        --package [EDGESHIP_OFFLINE=1]
  --pip-wheel FILE      bootstrap pip from this pip-*.whl when the Python has no ensurepip
                        (Debian without python3-venv) [EDGESHIP_PIP_WHEEL]

Which Python
  --python CMD          the Python that creates the virtualenv [EDGESHIP_PYTHON]
                        (default python3; a Jetson on JetPack 6 has 3.10, a Pi on Bookworm 3.11)
  --emulator CMD        a command prefix that runs the board's programs, for installing into
                        an emulated board from another machine: e.g. a script running
                        qemu-aarch64-static -L SYSROOT "$@". Leave it empty on a real board
                        [EDGESHIP_EMULATOR]

Service and check
  --bundle DIR          run `edgeship-agent check DIR` at the end, and write DIR as the bundle
                        of a newly created agent.toml [EDGESHIP_BUNDLE]
  --skip-systemd        skip the user, ownership and systemd steps [EDGESHIP_SKIP_SYSTEMD=1];
                        they are also skipped when not root or when systemd is not running
  --start               enable and start the service now [EDGESHIP_START=1]; otherwise edit
                        agent.toml first, then: systemctl enable --now edgeship-agent
  -h, --help            this text

Examples
  sudo bash install.sh --bundle /opt/edgeship/bundle
  sudo bash install.sh --runtime litert --bundle /opt/edgeship/bundle-int8
  bash install.sh --prefix ~/edgeship --config-dir ~/edgeship/etc \
       --state-dir ~/edgeship/state --skip-systemd           # no root, no service
EOF
}

log() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 2
}

need_value() {
	[[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
	--venv) need_value "$@"; VENV=$2; shift 2 ;;
	--config-dir) need_value "$@"; CONFIG_DIR=$2; shift 2 ;;
	--state-dir) need_value "$@"; STATE_DIR=$2; shift 2 ;;
	--unit-dir) need_value "$@"; UNIT_DIR=$2; shift 2 ;;
	--user) need_value "$@"; SERVICE_USER=$2; shift 2 ;;
	--package) need_value "$@"; PACKAGE=$2; shift 2 ;;
	--runtime) need_value "$@"; RUNTIME=$2; shift 2 ;;
	--system-site-packages) SYSTEM_SITE=1; shift ;;
	--find-links) need_value "$@"; FIND_LINKS=$2; shift 2 ;;
	--offline) OFFLINE=1; shift ;;
	--pip-wheel) need_value "$@"; PIP_WHEEL=$2; shift 2 ;;
	--python) need_value "$@"; PYTHON=$2; shift 2 ;;
	--emulator) need_value "$@"; EMULATOR=$2; shift 2 ;;
	--bundle) need_value "$@"; BUNDLE=$2; shift 2 ;;
	--skip-systemd) SKIP_SYSTEMD=1; shift ;;
	--start) START=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown option '$1' (see --help)" ;;
	esac
done

case $RUNTIME in
onnxruntime | litert | tflite | none) ;;
*) die "--runtime must be onnxruntime, litert, tflite or none, not '$RUNTIME'" ;;
esac
[[ $SERVICE_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user '$SERVICE_USER' is not a valid user name"

# Absolute paths: Python runs from / (see run_python), and the unit file needs them.
absolute() {
	case $1 in
	/*) printf '%s\n' "$1" ;;
	~/*) printf '%s\n' "$HOME/${1#\~/}" ;;
	*) printf '%s\n' "$PWD/$1" ;;
	esac
}
PREFIX=$(absolute "$PREFIX")
VENV=$(absolute "${VENV:-$PREFIX/venv}")
CONFIG_DIR=$(absolute "$CONFIG_DIR")
STATE_DIR=$(absolute "$STATE_DIR")
UNIT_DIR=$(absolute "$UNIT_DIR")
if [[ -n $BUNDLE ]]; then
	BUNDLE=$(absolute "$BUNDLE")
	[[ -f $BUNDLE/manifest.json ]] || die "--bundle $BUNDLE has no manifest.json (copy the bundle directory there first)"
fi
if [[ -n $FIND_LINKS ]]; then
	FIND_LINKS=$(absolute "$FIND_LINKS")
	[[ -d $FIND_LINKS ]] || die "--find-links $FIND_LINKS is not a directory"
fi
if [[ -n $PIP_WHEEL ]]; then
	PIP_WHEEL=$(absolute "$PIP_WHEEL")
	[[ -f $PIP_WHEEL ]] || die "--pip-wheel $PIP_WHEEL does not exist"
fi
# A local wheel or directory is installed by path; anything else is a requirement for pip.
if [[ -e $PACKAGE ]]; then
	PACKAGE=$(absolute "$PACKAGE")
fi

EMU=()
if [[ -n $EMULATOR ]]; then
	read -r -a EMU <<<"$EMULATOR"
fi

# Run a program of the board (through the emulator when there is one) from /, so that a
# device_agent/ in the current directory cannot shadow the installed one.
on_board() {
	(cd / && "${EMU[@]}" "$@")
}

is_root() { [[ $(id -u) -eq 0 ]]; }

systemd_reason=""
if [[ $SKIP_SYSTEMD == 1 ]]; then
	systemd_reason="EDGESHIP_SKIP_SYSTEMD=1 / --skip-systemd"
elif ! is_root; then
	systemd_reason="not running as root"
elif ! command -v systemctl >/dev/null 2>&1; then
	systemd_reason="no systemctl on this system"
elif [[ ! -d /run/systemd/system ]]; then
	systemd_reason="systemd is not running (a container or chroot?)"
fi

# Fail before installing anything when a directory cannot be created (not root, say).
writable_or_die() {
	local dir=$1
	while [[ ! -e $dir ]]; do dir=$(dirname "$dir"); done
	[[ -w $dir ]] || die "cannot create $1 (no write access to $dir): run with sudo, or choose a --prefix, --config-dir and --state-dir you can write to"
}
for dir in "$(dirname "$VENV")" "$CONFIG_DIR" "$STATE_DIR"; do writable_or_die "$dir"; done
[[ -n $systemd_reason ]] || writable_or_die "$UNIT_DIR"

# --- 1. the virtualenv -------------------------------------------------------------------------
PY=$PYTHON
if [[ ${#EMU[@]} -eq 0 && $PY != */* ]]; then
	PY=$(command -v "$PY") || die "no '$PYTHON' on PATH; install python3 or pass --python"
fi
log "virtualenv $VENV"
if [[ -x $VENV/bin/python || -L $VENV/bin/python ]]; then
	note "exists: reused (delete it to start over)"
else
	venv_args=()
	[[ $SYSTEM_SITE == 1 ]] && venv_args+=(--system-site-packages)
	if on_board "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
		:
	elif [[ -n $PIP_WHEEL ]]; then
		venv_args+=(--without-pip) # pip comes from --pip-wheel below
	elif is_root && [[ $OFFLINE != 1 && ${#EMU[@]} -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
		log "installing python3-venv (this Python has no ensurepip)"
		apt-get install -y python3-venv
	else
		die "$PYTHON cannot create a virtualenv with pip (no ensurepip): run 'sudo apt install python3-venv', or pass --pip-wheel pip-*.whl"
	fi
	mkdir -p "$(dirname "$VENV")"
	on_board "$PY" -m venv "${venv_args[@]}" "$VENV"
	note "created with $(on_board "$VENV/bin/python" -c 'import platform, sys; print(f"Python {platform.python_version()} on {platform.machine()} ({sys.executable})")')"
fi
VPY=$VENV/bin/python

if ! on_board "$VPY" -m pip --version >/dev/null 2>&1; then
	[[ -n $PIP_WHEEL ]] || die "$VENV has no pip; pass --pip-wheel pip-*.whl (or delete it and install python3-venv)"
	log "pip from $(basename "$PIP_WHEEL")"
	on_board "$VPY" "$PIP_WHEEL/pip" install --quiet --no-index --disable-pip-version-check "$PIP_WHEEL"
fi

# --- 2. edgeship and its runtime ---------------------------------------------------------------
# "edgeship==0.1.0" with extra "agent" is "edgeship[agent]==0.1.0"; a path takes "[agent]" last.
with_extra() {
	local spec=$1 extra=$2
	if [[ -e $spec ]]; then
		printf '%s[%s]\n' "$spec" "$extra"
	elif [[ $spec =~ ^([A-Za-z0-9._-]+)(.*)$ ]]; then
		printf '%s[%s]%s\n' "${BASH_REMATCH[1]}" "$extra" "${BASH_REMATCH[2]}"
	else
		die "--package '$spec' is neither a path nor a requirement"
	fi
}

numpy_major() {
	on_board "$VPY" -c 'import numpy; print(numpy.__version__.split(".")[0])' 2>/dev/null || true
}

case $RUNTIME in
onnxruntime) requirements=("$(with_extra "$PACKAGE" agent)") ;;
litert)
	if [[ $(numpy_major) == 1 ]]; then
		note "numpy 1.x is present: LiteRT comes from tflite-runtime, which is built for it, and numpy stays 1.x"
		requirements=("$PACKAGE" "numpy<2" "tflite-runtime")
	else
		requirements=("$(with_extra "$PACKAGE" litert)")
	fi
	;;
tflite) requirements=("$PACKAGE" "numpy<2" "tflite-runtime") ;;
none) requirements=("$PACKAGE") ;;
esac

pip_args=(install --upgrade --disable-pip-version-check --no-input --progress-bar off)
[[ -n $FIND_LINKS ]] && pip_args+=(--find-links "$FIND_LINKS")
[[ $OFFLINE == 1 ]] && pip_args+=(--no-index)
installed_before=$(on_board "$VPY" -c 'import importlib.metadata as m; print(m.version("edgeship"))' 2>/dev/null || true)
log "pip install ${requirements[*]} (runtime: $RUNTIME)"
on_board "$VPY" -m pip "${pip_args[@]}" "${requirements[@]}"
if [[ -e $PACKAGE && -n $installed_before ]]; then
	# pip keeps an installed version equal to the wheel's, even if the wheel was rebuilt.
	log "reinstalling edgeship from $PACKAGE (it was installed before)"
	on_board "$VPY" -m pip "${pip_args[@]}" --force-reinstall --no-deps "$PACKAGE"
fi
note "$(on_board "$VPY" -c 'import importlib.metadata as m; print("edgeship", m.version("edgeship"), "with numpy", m.version("numpy"))')"

# --- 3. user, directories, configuration -------------------------------------------------------
if [[ -z $systemd_reason ]]; then
	if id -u "$SERVICE_USER" >/dev/null 2>&1; then
		log "user $SERVICE_USER exists"
	else
		log "creating system user $SERVICE_USER"
		useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
			--shell /usr/sbin/nologin --comment "edgeship device agent" "$SERVICE_USER"
	fi
	# vcgencmd (/dev/vcio) and cameras (/dev/video*) belong to the video group on a Pi.
	if getent group video >/dev/null 2>&1; then
		usermod -a -G video "$SERVICE_USER"
	fi
else
	log "skipping the service user: $systemd_reason"
fi

# Owner and mode are set on directories made here only: --config-dir /etc must not chown /etc.
make_dir() {
	local dir=$1 owner=$2
	if [[ -d $dir ]]; then
		note "$dir exists: owner and mode left as they are"
		return
	fi
	mkdir -p "$dir"
	if [[ -z $systemd_reason ]]; then
		chown "$owner" "$dir"
		chmod 0750 "$dir"
	fi
}
log "directories $CONFIG_DIR, $STATE_DIR"
make_dir "$CONFIG_DIR" "root:$SERVICE_USER"
make_dir "$STATE_DIR" "$SERVICE_USER:$SERVICE_USER"

# sed replacement text with the delimiter |, & and \ escaped.
sed_escape() { printf '%s\n' "$1" | sed -e 's/[|&\\]/\\&/g'; }

TOML=$CONFIG_DIR/agent.toml
if [[ -e $TOML ]]; then
	log "$TOML exists: kept (the example is $SCRIPT_DIR/agent.toml)"
else
	log "writing $TOML"
	bundle_line=$(sed_escape "${BUNDLE:-$PREFIX/bundle}")
	sed -e "s|^bundle = .*|bundle = \"$bundle_line\"|" \
		-e "s|^state_dir = .*|state_dir = \"$(sed_escape "$STATE_DIR")\"|" \
		"$SCRIPT_DIR/agent.toml" >"$TOML.tmp"
	mv "$TOML.tmp" "$TOML"
	note "edit broker_url and fleet there before starting the service"
fi
ENV_FILE=$CONFIG_DIR/agent.env
if [[ -e $ENV_FILE ]]; then
	log "$ENV_FILE exists: kept"
else
	log "writing $ENV_FILE (the place for secrets: not world-readable)"
	(
		umask 077
		cat >"$ENV_FILE" <<'EOF'
# Environment of edgeship-agent.service. Secrets belong here rather than in agent.toml:
# EDGESHIP_AGENT_<SETTING> overrides the setting of the same name in agent.toml.
#EDGESHIP_AGENT_PASSWORD=change-me
#EDGESHIP_AGENT_DEVICE_ID=pi-07
EOF
	)
fi
if [[ -z $systemd_reason ]]; then
	chown "root:$SERVICE_USER" "$TOML" "$ENV_FILE"
	chmod 0640 "$TOML" "$ENV_FILE"
fi

# --- 4. the systemd unit -----------------------------------------------------------------------
render_unit() {
	sed -e "s|/opt/edgeship/venv|$(sed_escape "$VENV")|g" \
		-e "s|/etc/edgeship|$(sed_escape "$CONFIG_DIR")|g" \
		-e "s|/var/lib/edgeship|$(sed_escape "$STATE_DIR")|g" \
		-e "s|^User=edgeship$|User=$SERVICE_USER|" \
		-e "s|^Group=edgeship$|Group=$SERVICE_USER|" \
		"$SCRIPT_DIR/edgeship-agent.service"
}
if [[ -z $systemd_reason ]]; then
	log "installing $UNIT_DIR/edgeship-agent.service"
	mkdir -p "$UNIT_DIR"
	render_unit >"$UNIT_DIR/edgeship-agent.service"
	systemctl daemon-reload
else
	mkdir -p "$PREFIX"
	render_unit >"$PREFIX/edgeship-agent.service"
	log "skipping systemd: $systemd_reason"
	note "the unit for these paths is in $PREFIX/edgeship-agent.service"
fi

# --- 5. check the bundle -----------------------------------------------------------------------
if [[ -n $BUNDLE ]]; then
	log "edgeship-agent check $BUNDLE"
	if [[ ${#EMU[@]} -gt 0 ]]; then
		# The console script's #! line names the board's Python, which only the emulator runs.
		on_board "$VPY" "$VENV/bin/edgeship-agent" check "$BUNDLE"
	else
		on_board "$VENV/bin/edgeship-agent" check "$BUNDLE"
	fi
else
	note "no --bundle: check one later with $VENV/bin/edgeship-agent check DIR"
fi

if [[ -z $systemd_reason ]]; then
	if [[ $START == 1 ]]; then
		log "starting edgeship-agent"
		systemctl enable --now edgeship-agent
		systemctl --no-pager --lines=5 status edgeship-agent || true
	else
		log "done; after editing $TOML: sudo systemctl enable --now edgeship-agent"
	fi
else
	log "done; run it in the foreground with:"
	note "$VENV/bin/edgeship-agent run --config $TOML"
fi
