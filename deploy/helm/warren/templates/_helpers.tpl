{{/* A component's image: (dict "root" $ "name" "agent"|"controller"). */}}
{{- define "warren.image" -}}
{{ index .root.Values.image .name }}:{{ .root.Values.image.tag }}
{{- end }}

{{/* Labels every object carries; `name` is the component. */}}
{{- define "warren.labels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/part-of: warren
{{- end }}

{{/* The controller, as agents dial it: agent.controllerAddress, or its Service. */}}
{{- define "warren.controllerHost" -}}
{{- if .Values.agent.controllerAddress -}}
{{ .Values.agent.controllerAddress }}
{{- else -}}
warren-controller.{{ .Release.Namespace }}.svc
{{- end }}
{{- end }}

{{/* KUBERNETES_SERVICE_HOST/PORT overrides (k8sServiceHost/k8sServicePort), for a container's env. */}}
{{- define "warren.apiServerEnv" -}}
{{- if .Values.k8sServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sServicePort | quote }}
{{- end }}
{{- end }}
