{{/*
Names and labels shared by every template. Nothing here may depend on time or randomness:
`helm template` must render the same bytes every time (the committed
deploy/manifests/ebpf-mesh.yaml is compared with it).
*/}}

{{- define "ebpf-mesh.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name for namespaced objects; cluster-scoped ones add the namespace
(unless it is the same name), so releases in two namespaces do not collide. */}}
{{- define "ebpf-mesh.fullname" -}}
{{- if eq .Release.Name .Chart.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ebpf-mesh.clusterRoleName" -}}
{{- $full := include "ebpf-mesh.fullname" . -}}
{{- if eq $full .Release.Namespace -}}
{{- $full -}}
{{- else -}}
{{- printf "%s-%s" $full .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ebpf-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ebpf-mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ebpf-mesh.labels" -}}
{{ include "ebpf-mesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-proxy
app.kubernetes.io/part-of: ebpf-mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "ebpf-mesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A TOML array of integers, e.g. [22, 2379]. */}}
{{- define "ebpf-mesh.tomlInts" -}}
[{{- range $i, $v := . }}{{ if $i }}, {{ end }}{{ int $v }}{{ end -}}]
{{- end -}}

{{/* A TOML array of strings, e.g. ["169.254.169.254/32"]. */}}
{{- define "ebpf-mesh.tomlStrings" -}}
[{{- range $i, $v := . }}{{ if $i }}, {{ end }}{{ toString $v | quote }}{{ end -}}]
{{- end -}}

{{/* Checks of values that would otherwise only fail on the node (exit code 3). */}}
{{- define "ebpf-mesh.validate" -}}
{{- if not (has .Values.discovery (list "kubernetes" "file")) -}}
{{- fail (printf "discovery: %q is not one of kubernetes, file" (toString .Values.discovery)) -}}
{{- end -}}
{{- if and (not .Values.identity.enabled) (ne .Values.trustDomain "cluster.local") -}}
{{- fail (printf "trustDomain: %q takes effect only with identity.enabled=true (the proxy reads it from [identity]); enable identity or leave cluster.local" .Values.trustDomain) -}}
{{- end -}}
{{- if .Values.identity.enabled -}}
{{- $_ := required "identity.issuer: set the ADDRESS:PORT of `proxy identity serve`" .Values.identity.issuer -}}
{{- $_ := required "identity.secretName: name a Secret with the keys anchors.pem and token" .Values.identity.secretName -}}
{{- end -}}
{{- end -}}
