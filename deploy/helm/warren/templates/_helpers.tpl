{{/* The one image both workloads run. */}}
{{- define "warren.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/* Labels every object carries; `name` is the component. */}}
{{- define "warren.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: warren
{{- end }}

{{/* The controller's Service, as agents dial it. */}}
{{- define "warren.controllerHost" -}}
warren-controller.{{ .Release.Namespace }}.svc
{{- end }}
