{{/* Chart name, release-qualified full name (63-char DNS label), labels. */}}
{{- define "qkb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qkb.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "qkb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qkb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qkb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "qkb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: bridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "qkb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qkb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* BRIDGE_GROUP_ID: kafka.groupId, else the release's full name. Its members share the
sessions, and its transactional ids are <group>-<shard>: two releases on one Kafka cluster
must not share it. */}}
{{- define "qkb.groupId" -}}
{{- default (include "qkb.fullname" .) .Values.kafka.groupId }}
{{- end }}

{{- define "qkb.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Kafka ports for the NetworkPolicy: the configured ones, else those of bootstrapServers. */}}
{{- define "qkb.kafkaPorts" -}}
{{- $ports := list }}
{{- if .Values.networkPolicy.kafka.ports }}
{{- $ports = .Values.networkPolicy.kafka.ports }}
{{- else }}
{{- range (splitList "," .Values.kafka.bootstrapServers) }}
{{- $port := regexFind "[0-9]+$" (trim .) }}
{{- if not $port }}
{{- fail (printf "kafka.bootstrapServers: %q has no port; write host:port" (trim .)) }}
{{- end }}
{{- $ports = append $ports (atoi $port) }}
{{- end }}
{{- end }}
{{- toJson (uniq $ports) }}
{{- end }}

{{/* Settings that only make sense together; fail at render time, naming the value. */}}
{{- define "qkb.validate" -}}
{{- $protocol := .Values.kafka.securityProtocol }}
{{- if hasPrefix "SASL_" $protocol }}
{{- if not .Values.kafka.sasl.mechanism }}
{{- fail (printf "kafka.sasl.mechanism is required with kafka.securityProtocol=%s (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)" $protocol) }}
{{- end }}
{{- if not .Values.kafka.sasl.username }}
{{- fail (printf "kafka.sasl.username is required with kafka.securityProtocol=%s" $protocol) }}
{{- end }}
{{- if not .Values.kafka.sasl.passwordSecret.name }}
{{- fail (printf "kafka.sasl.passwordSecret.name is required with kafka.securityProtocol=%s" $protocol) }}
{{- end }}
{{- else if .Values.kafka.sasl.mechanism }}
{{- fail (printf "kafka.sasl.mechanism is set but kafka.securityProtocol=%s; use SASL_SSL or SASL_PLAINTEXT" $protocol) }}
{{- end }}
{{- if and (or .Values.kafka.tls.caSecret.name .Values.kafka.tls.clientCertSecret.name) (not (hasSuffix "SSL" $protocol)) }}
{{- fail (printf "kafka.tls secrets are set but kafka.securityProtocol=%s; use SSL or SASL_SSL" $protocol) }}
{{- end }}
{{- if .Values.delivery.transactionalIdPrefix }}
{{- fail "delivery.transactionalIdPrefix is gone: transactional ids are <kafka.groupId>-<shard> now, whatever the pods are called. Set kafka.groupId instead (default: the release's full name; two releases on one Kafka cluster need different ones)" }}
{{- end }}
{{- if not .Values.qoder.token.existingSecret }}
{{- fail "qoder.token.existingSecret is required: without a token the bridge would run its built-in simulator" }}
{{- end }}
{{- end }}
