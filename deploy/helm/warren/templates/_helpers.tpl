{{/* A component's image: (dict "root" $ "name" "agent"|"controller"). */}}
{{- define "warren.image" -}}
{{ index .root.Values.image .name }}:{{ .root.Values.image.tag }}
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
