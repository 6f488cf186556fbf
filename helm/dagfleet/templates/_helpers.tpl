{{- define "dagfleet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dagfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dagfleet.labels" -}}
app.kubernetes.io/name: {{ include "dagfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "dagfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dagfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dagfleet.tag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{/* Environment shared by every dagfleet container: NATS, store, secrets by reference.
     Called with (dict "root" $ "identity" "<coordinator or role>"). */}}
{{- define "dagfleet.env" -}}
{{- $root := .root -}}
{{- $identity := .identity -}}
- name: DAGFLEET_CONFIG
  value: /etc/dagfleet/dagfleet.toml
- name: DAGFLEET_NATS__URL
  value: {{ $root.Values.nats.url | quote }}
- name: DAGFLEET_QUEUES__REPLICAS
  value: {{ $root.Values.nats.replicas | default 1 | quote }}
{{- with $root.Values.nats.auth }}
{{- if and .existingSecret .perRole }}
- name: DAGFLEET_NATS__USER
  value: {{ $identity | quote }}
- name: DAGFLEET_NATS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ printf "%s-password" $identity }}
{{- else if and .existingSecret (not .credsKey) }}
- name: DAGFLEET_NATS__USER
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .userKey }}
- name: DAGFLEET_NATS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .passwordKey }}
{{- end }}
{{- if and .existingSecret .credsKey (not .perRole) }}
- name: DAGFLEET_NATS__CREDS_FILE
  value: /etc/dagfleet/nats/{{ .credsKey }}
{{- end }}
{{- end }}
- name: DAGFLEET_STORE__URL
  value: {{ $root.Values.store.url | quote }}
{{- if $root.Values.store.endpoint }}
- name: DAGFLEET_STORE__ENDPOINT
  value: {{ $root.Values.store.endpoint | quote }}
{{- end }}
- name: DAGFLEET_STORE__REGION
  value: {{ $root.Values.store.region | quote }}
- name: DAGFLEET_STORE__ALLOW_HTTP
  value: {{ $root.Values.store.allowHttp | quote }}
{{- with $root.Values.store.credentials }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "dagfleet.volumes" -}}
- name: config
  {{- if .Values.configSecret }}
  secret:
    secretName: {{ .Values.configSecret }}
  {{- else }}
  configMap:
    name: {{ include "dagfleet.fullname" . }}-config
  {{- end }}
- name: tmp
  emptyDir: {}
{{- if and .Values.nats.auth.existingSecret .Values.nats.auth.credsKey (not .Values.nats.auth.perRole) }}
- name: nats-creds
  secret:
    secretName: {{ .Values.nats.auth.existingSecret }}
{{- end }}
{{- end -}}

{{- define "dagfleet.volumeMounts" -}}
- name: config
  mountPath: /etc/dagfleet
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if and .Values.nats.auth.existingSecret .Values.nats.auth.credsKey (not .Values.nats.auth.perRole) }}
- name: nats-creds
  mountPath: /etc/dagfleet/nats
  readOnly: true
{{- end }}
{{- end -}}
