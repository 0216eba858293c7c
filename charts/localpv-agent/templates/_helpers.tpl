{{/* The chart name, or nameOverride. */}}
{{- define "localpv-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The object name prefix: fullnameOverride, else the release name (when it holds the
chart name) or release-chart, cut to 63 characters. */}}
{{- define "localpv-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "localpv-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels selecting the agent's pods. */}}
{{- define "localpv-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "localpv-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object: the selector labels and Helm's. */}}
{{- define "localpv-agent.labels" -}}
{{ include "localpv-agent.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "localpv-agent.chart" . }}
{{- end -}}

{{- define "localpv-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "localpv-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "localpv-agent.configMapName" -}}
{{- printf "%s-config" (include "localpv-agent.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "localpv-agent.image" -}}
{{- tpl .Values.image . -}}
{{- end -}}

{{/* The directories the DaemonSet mounts for the classes, as a YAML list of
{name, hostDir, mountDir}: one per distinct mountDir, in the classes' order, named
local-disks, local-disks-1, ... Classes sharing a mountDir must share the hostDir. */}}
{{- define "localpv-agent.classMounts" -}}
{{- $mounts := list -}}
{{- $seen := dict -}}
{{- range .Values.classes -}}
{{- $mountDir := default .hostDir .mountDir -}}
{{- if hasKey $seen $mountDir -}}
{{- if ne (get $seen $mountDir) .hostDir -}}
{{- fail (printf "classes: %s has mountDir %s from hostDir %s, but another class mounts %s there" .name $mountDir .hostDir (get $seen $mountDir)) -}}
{{- end -}}
{{- else -}}
{{- $_ := set $seen $mountDir .hostDir -}}
{{- $volume := "local-disks" -}}
{{- if $mounts -}}{{- $volume = printf "local-disks-%d" (len $mounts) -}}{{- end -}}
{{- $mounts = append $mounts (dict "name" $volume "hostDir" .hostDir "mountDir" $mountDir) -}}
{{- end -}}
{{- end -}}
{{- toYaml $mounts -}}
{{- end -}}

{{/* remediation settings, with the upstream nodeCleanupController's taken where unset. */}}
{{- define "localpv-agent.remediation" -}}
{{- $r := deepCopy .Values.remediation -}}
{{- $up := .Values.nodeCleanupController | default dict -}}
{{- if and (not $r.enabled) $up.enabled -}}{{- $_ := set $r "enabled" true -}}{{- end -}}
{{- range $key := list "storageClassNames" "pvcDeletionDelay" "stalePVDiscoveryInterval" -}}
{{- if and (not (get $r $key)) (get $up $key) -}}{{- $_ := set $r $key (get $up $key) -}}{{- end -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{- define "localpv-agent.remediateName" -}}
{{- printf "%s-remediate" (include "localpv-agent.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of the remediation controller's objects. */}}
{{- define "localpv-agent.remediateSelectorLabels" -}}
app.kubernetes.io/name: {{ include "localpv-agent.remediateName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "localpv-agent.remediateLabels" -}}
{{ include "localpv-agent.remediateSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "localpv-agent.chart" . }}
{{- end -}}
