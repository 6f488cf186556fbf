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

{{/* Environment shared by every dagfleet container: NATS, store, secrets by reference. */}}
{{- define "dagfleet.env" -}}
- name: DAGFLEET_CONFIG
  value: /etc/dagfleet/dagfleet.toml
- name: DAGFLEET_NATS__URL
  value: {{ .Values.nats.url | quote }}
{{- with .Values.nats.auth }}
{{- if and .existingSecret (not .credsKey) }}
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
{{- if and .existingSecret .credsKey }}
- name: DAGFLEET_NATS__CREDS_FILE
  value: /etc/dagfleet/nats/{{ .credsKey }}
{{- end }}
{{- end }}
- name: DAGFLEET_STORE__URL
  value: {{ .Values.store.url | quote }}
{{- if .Values.store.endpoint }}
- name: DAGFLEET_STORE__ENDPOINT
  value: {{ .Values.store.endpoint | quote }}
{{- end }}
- name: DAGFLEET_STORE__REGION
  value: {{ .Values.store.region | quote }}
- name: DAGFLEET_STORE__ALLOW_HTTP
  value: {{ .Values.store.allowHttp | quote }}
{{- with .Values.store.credentials }}
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
  configMap:
    name: {{ include "dagfleet.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- if and .Values.nats.auth.existingSecret .Values.nats.auth.credsKey }}
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
{{- if and .Values.nats.auth.existingSecret .Values.nats.auth.credsKey }}
- name: nats-creds
  mountPath: /etc/dagfleet/nats
  readOnly: true
{{- end }}
{{- end -}}
